//! Every seed and every regression input, fed to its target's decoder: none may panic; every input under
//! `regressions/TARGET/` (each once crashed a fuzzer) must be refused with an error; every seed is accepted unless
//! its name starts with `bad-`, and then it is refused.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use phaul_fuzz::{files_under, Outcome, Scratch, Target, TARGETS};

fn dir(kind: &str, t: &Target) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(kind).join(t.name)
}

fn feed(t: &Target, scratch: &Scratch, path: &Path) -> Outcome {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match catch_unwind(AssertUnwindSafe(|| (t.run)(scratch, &data))) {
        Ok(outcome) => outcome,
        Err(_) => panic!("target {} panicked on {}", t.name, path.display()),
    }
}

#[test]
fn regression_inputs_are_refused_without_a_panic() {
    let scratch = Scratch::new().expect("scratch");
    let mut n = 0;
    for t in TARGETS {
        let regressions = dir("regressions", t);
        if !regressions.is_dir() {
            continue; // no input ever crashed it
        }
        for path in files_under(&[regressions]) {
            let outcome = feed(t, &scratch, &path);
            assert!(outcome.is_err(), "target {}: {} was accepted", t.name, path.display());
            n += 1;
        }
    }
    println!("{n} regression inputs refused");
}

#[test]
fn seeds_are_accepted_or_refused_as_named() {
    let scratch = Scratch::new().expect("scratch");
    for t in TARGETS {
        let seeds = files_under(&[dir("corpus", t)]);
        assert!(!seeds.is_empty(), "target {} has no seeds", t.name);
        for path in seeds {
            let bad = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("bad-"));
            match feed(t, &scratch, &path) {
                Ok(()) => assert!(!bad, "target {}: {} was accepted", t.name, path.display()),
                Err(e) => assert!(bad, "target {}: {} was refused: {e}", t.name, path.display()),
            }
        }
    }
}

#[test]
fn generated_seeds_match_the_committed_corpus() {
    for s in phaul_fuzz::seeds::all() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(s.target).join(&s.name);
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; run gen-corpus", path.display()));
        assert_eq!(committed, s.bytes, "{} differs from what gen-corpus makes; run it again", path.display());
    }
}

#[test]
fn every_target_has_a_binary() {
    for t in TARGETS {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin").join(format!("{}.rs", t.name));
        assert!(bin.is_file(), "{} is missing", bin.display());
    }
}
