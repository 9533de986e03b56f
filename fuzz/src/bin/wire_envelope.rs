//! Fuzz target `wire_envelope`: see fuzz/README.md and `phaul_fuzz::wire_envelope`.

fn main() {
    phaul_fuzz::main("wire_envelope");
}
