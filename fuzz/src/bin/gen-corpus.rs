//! Writes the generated seed corpus to `fuzz/corpus/TARGET/` (`phaul_fuzz::seeds`), and with
//! `--criu-dump DIR` also seeds made of the images a real CRIU dump wrote there (`fuzz/criu-seeds` does both).
//! Not a fuzz target.

use std::path::{Path, PathBuf};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = phaul_fuzz::seeds::all();
    match args.as_slice() {
        [] => {}
        [flag, dir] if flag == "--criu-dump" => seeds = phaul_fuzz::seeds::from_criu_dump(Path::new(dir)),
        _ => {
            eprintln!("usage: gen-corpus [--criu-dump DIR]");
            std::process::exit(2);
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for s in &seeds {
        let dir = root.join(s.target);
        std::fs::create_dir_all(&dir).expect("creating the corpus directory");
        let path = dir.join(&s.name);
        std::fs::write(&path, &s.bytes).expect("writing a seed");
        println!("{} ({} bytes)", path.display(), s.bytes.len());
    }
}
