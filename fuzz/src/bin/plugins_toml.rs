//! Fuzz target `plugins_toml`: see fuzz/README.md and `phaul_fuzz::plugins_toml`.

fn main() {
    phaul_fuzz::main("plugins_toml");
}
