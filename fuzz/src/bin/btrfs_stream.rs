//! Fuzz target `btrfs_stream`: see fuzz/README.md and `phaul_fuzz::btrfs_stream`.

fn main() {
    phaul_fuzz::main("btrfs_stream");
}
