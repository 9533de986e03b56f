//! Fuzz target `wire_stream`: see fuzz/README.md and `phaul_fuzz::wire_stream`.

fn main() {
    phaul_fuzz::main("wire_stream");
}
