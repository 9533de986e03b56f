//! Fuzz target `image_tty`: see fuzz/README.md and `phaul_fuzz::image_tty`.

fn main() {
    phaul_fuzz::main("image_tty");
}
