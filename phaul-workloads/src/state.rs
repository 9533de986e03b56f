//! The state file every workload publishes, and the probe file it reads.
//!
//! `DIR/state.json` is always replaced atomically (write `DIR/.state.json.tmp`, then rename) and never kept
//! open, so a checkpoint never catches it half-written or open. `DIR/probe` holds the decimal nonce of the
//! latest probe; it is opened, read and closed only when a probe signal arrives.

use std::io;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// Name of the temporary file the state is written to before being renamed over [`STATE_FILE`].
pub const STATE_TMP_FILE: &str = ".state.json.tmp";
/// Name of the probe file inside the state directory.
pub const PROBE_FILE: &str = "probe";

/// The fields every kind publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommonState {
    /// The workload kind, e.g. `"memory"`.
    pub kind: String,
    /// Increments on every tick; lives in memory, so it continues after a migration.
    pub counter: u64,
    /// Nonce of the last probe answered (0 before the first probe).
    pub nonce: u64,
    /// Whether the workload's self-check passes.
    pub ok: bool,
    /// Why the self-check fails (empty when `ok`).
    pub detail: String,
    /// The workload's pid as seen in its own pid namespace (1 for the namespace's init).
    pub ns_pid: i32,
}

/// The JSON object published: the common fields followed by the kind's own fields. A kind field never
/// overrides a common one.
pub fn render(common: &CommonState, extra: Map<String, Value>) -> Value {
    let mut obj = Map::new();
    obj.insert("kind".into(), Value::from(common.kind.clone()));
    obj.insert("counter".into(), Value::from(common.counter));
    obj.insert("nonce".into(), Value::from(common.nonce));
    obj.insert("ok".into(), Value::from(common.ok));
    obj.insert("detail".into(), Value::from(common.detail.clone()));
    obj.insert("ns_pid".into(), Value::from(common.ns_pid));
    for (k, v) in extra {
        obj.entry(k).or_insert(v);
    }
    Value::Object(obj)
}

/// Replace `dir/state.json` atomically with `state`.
pub fn write_state(dir: &Path, state: &Value) -> io::Result<()> {
    let tmp = dir.join(STATE_TMP_FILE);
    let mut bytes = serde_json::to_vec(state).map_err(io::Error::other)?;
    bytes.push(b'\n');
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))
}

/// Parse the contents of a probe file: one decimal u64, surrounding whitespace allowed.
pub fn parse_probe(text: &str) -> Result<u64, String> {
    let t = text.trim();
    t.parse::<u64>().map_err(|e| format!("probe file holds {t:?}, not a decimal u64: {e}"))
}

/// Read and parse `dir/probe` (opened, read and closed here).
pub fn read_probe(dir: &Path) -> Result<u64, String> {
    let path = dir.join(PROBE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_probe(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common() -> CommonState {
        CommonState { kind: "memory".into(), counter: 5, nonce: 9, ok: false, detail: "bad".into(), ns_pid: 1 }
    }

    #[test]
    fn render_has_common_and_extra_fields() {
        let mut extra = Map::new();
        extra.insert("size_mib".into(), Value::from(16));
        extra.insert("counter".into(), Value::from(999)); // must not override
        let v = render(&common(), extra);
        assert_eq!(v["kind"], "memory");
        assert_eq!(v["counter"], 5);
        assert_eq!(v["nonce"], 9);
        assert_eq!(v["ok"], false);
        assert_eq!(v["detail"], "bad");
        assert_eq!(v["ns_pid"], 1);
        assert_eq!(v["size_mib"], 16);
    }

    #[test]
    fn render_matches_serde_of_common() {
        let v = render(&common(), Map::new());
        let direct = serde_json::to_value(common()).expect("CommonState serializes");
        assert_eq!(v, direct);
    }

    #[test]
    fn write_state_is_atomic_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = render(&common(), Map::new());
        write_state(dir.path(), &v).expect("write");
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).expect("read back");
        let back: Value = serde_json::from_str(&text).expect("valid json");
        assert_eq!(back, v);
        assert!(!dir.path().join(STATE_TMP_FILE).exists());
    }

    #[test]
    fn probe_parsing() {
        assert_eq!(parse_probe("123\n"), Ok(123));
        assert_eq!(parse_probe("  7 "), Ok(7));
        assert!(parse_probe("").is_err());
        assert!(parse_probe("x").is_err());
        assert!(parse_probe("-1").is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(read_probe(dir.path()).is_err());
        std::fs::write(dir.path().join(PROBE_FILE), "77").expect("write probe");
        assert_eq!(read_probe(dir.path()), Ok(77));
    }
}
