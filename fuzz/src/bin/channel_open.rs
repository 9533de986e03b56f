//! Fuzz target `channel_open`: see fuzz/README.md and `phaul_fuzz::channel_open`.

fn main() {
    phaul_fuzz::main("channel_open");
}
