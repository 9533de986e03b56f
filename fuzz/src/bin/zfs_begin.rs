//! Fuzz target `zfs_begin`: see fuzz/README.md and `phaul_fuzz::zfs_begin`.

fn main() {
    phaul_fuzz::main("zfs_begin");
}
