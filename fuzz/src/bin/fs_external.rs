//! Fuzz target `fs_external`: see fuzz/README.md and `phaul_fuzz::fs_external`.

fn main() {
    phaul_fuzz::main("fs_external");
}
