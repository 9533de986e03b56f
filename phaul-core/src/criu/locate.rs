//! Where phaul finds CRIU.
//!
//! In order: `--criu PATH`, the `PHAUL_CRIU` environment variable, the copy `scripts/setup` installs
//! ([`SETUP_DEFAULT_CRIU`]), then `criu` on `PATH`.

use std::path::{Path, PathBuf};

/// Where `scripts/setup` installs a CRIU that works on the host kernel (a wrapper that starts it through its own
/// dynamic loader, so the system's libc is left alone).
pub const SETUP_DEFAULT_CRIU: &str = "/opt/phaul/criu/bin/criu";

/// The oldest CRIU phaul supports: the first with every RPC field phaul sets (mntns_compat_mode, network_lock).
pub const MIN_CRIU: (u32, u32, u32) = (3, 17, 0);

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("the CRIU given with {source_name} ({path}) does not exist or is not executable; fix the path or run scripts/setup")]
    Missing { source_name: &'static str, path: PathBuf },
    #[error(
        "no CRIU found: not at {default} (where scripts/setup installs it) nor on PATH; run scripts/setup, or name one with --criu PATH or PHAUL_CRIU"
    )]
    NotFound { default: &'static str },
}

/// A CRIU binary and how it was chosen.
#[derive(Debug, Clone)]
pub struct CriuLocation {
    pub path: PathBuf,
    pub chosen_by: &'static str,
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Finds CRIU as documented above.
pub fn locate_criu(explicit: Option<&Path>) -> Result<CriuLocation, LocateError> {
    if let Some(p) = explicit {
        return if is_executable(p) {
            Ok(CriuLocation { path: p.to_path_buf(), chosen_by: "--criu" })
        } else {
            Err(LocateError::Missing { source_name: "--criu", path: p.to_path_buf() })
        };
    }
    if let Some(p) = std::env::var_os("PHAUL_CRIU").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(CriuLocation { path: p, chosen_by: "PHAUL_CRIU" })
        } else {
            Err(LocateError::Missing { source_name: "PHAUL_CRIU", path: p })
        };
    }
    let default = Path::new(SETUP_DEFAULT_CRIU);
    if is_executable(default) {
        return Ok(CriuLocation { path: default.to_path_buf(), chosen_by: "the scripts/setup default" });
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("criu");
            if is_executable(&p) {
                return Ok(CriuLocation { path: p, chosen_by: "PATH" });
            }
        }
    }
    Err(LocateError::NotFound { default: SETUP_DEFAULT_CRIU })
}
