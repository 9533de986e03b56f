//! Finding binaries built by the workspace.

use std::path::PathBuf;

use crate::error::TestbedError;

/// Find the workspace-built binary `name`.
///
/// Looks in `$PHAUL_BIN_DIR` if set (and only there), otherwise next to the running executable: a test
/// runs as `target/<profile>/deps/<test>-<hash>`, so `target/<profile>/` is searched, and the executable's
/// own directory too (for binaries that use the testbed).
pub fn locate_binary(name: &str) -> Result<PathBuf, TestbedError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("PHAUL_BIN_DIR") {
        dirs.push(PathBuf::from(dir));
    } else {
        let exe = std::env::current_exe().map_err(|e| TestbedError::io("finding the current executable", e))?;
        if let Some(dir) = exe.parent() {
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(up) = dir.parent() {
                    dirs.push(up.to_path_buf());
                }
            }
            dirs.push(dir.to_path_buf());
        }
    }
    for dir in &dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let searched = if dirs.is_empty() {
        "nowhere (no directory for the current executable)".to_string()
    } else {
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    };
    Err(TestbedError::BinaryNotFound { name: name.to_string(), searched })
}
