//! Fuzz target `image_stats`: see fuzz/README.md and `phaul_fuzz::image_stats`.

fn main() {
    phaul_fuzz::main("image_stats");
}
