//! Image sets kept under `--img-path`: what `phaul images` lists and `phaul images prune` (and `phaul serve
//! --keep-failed N`) removes.
//!
//! Each migration has one image directory per side (`HTYPE-ID-SESSION-source`, `HTYPE-ID-SESSION-destination`).
//! A failed migration keeps its directories (they are what one inspects), and so does one run with
//! `--keep-images`. The session's journal under `--state-dir` says how it ended. A set is **never** removed when:
//! - its session is not settled: in progress, held, committing, or in doubt (`phaul resolve` may still need the
//!   source's copy, which may be exactly these images);
//! - any process has a file or its working directory in it (a lazy-pages daemon still serving a post-copy
//!   restore, a CRIU, an operator's shell);
//! - it is not phaul's (its name is not an image directory name phaul makes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::journal::{DestinationJournal, DestinationState, Journals, SourceJournal, SourceState};

/// One kept image directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeptSet {
    pub dir: PathBuf,
    /// `source` or `destination` (`check` for a CPU-check leftover).
    pub side: &'static str,
    pub session: String,
    pub bytes: u64,
    /// Seconds since it last changed.
    pub age_s: u64,
    /// How its session ended, from its journal: `migrated`, `rolled-back`, `aborted`, `lost`, `in-doubt`,
    /// `in-progress`, or `unknown` (no journal).
    pub outcome: String,
    /// Why it must not be removed, if it must not.
    pub protected: Option<String>,
}

impl KeptSet {
    /// A failed migration's set (what `--keep-failed` counts).
    pub fn failed(&self) -> bool {
        matches!(self.outcome.as_str(), "rolled-back" | "aborted" | "lost")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeptError {
    #[error("cannot read the image directory {dir}: {source}")]
    Read { dir: PathBuf, source: std::io::Error },
    #[error("the state directory {0} does not exist, so no session's outcome is known; refusing to prune (give the --state-dir the migrations used)")]
    NoStateDir(PathBuf),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

/// `(side, session)` from an image directory name phaul makes, or `None` for any other name.
fn parse_name(name: &str) -> Option<(&'static str, String)> {
    let session_at = |stem: &str| -> Option<String> {
        let s = stem.rsplit('-').next()?;
        (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_string())
    };
    if let Some(stem) = name.strip_suffix("-source") {
        return session_at(stem).map(|s| ("source", s));
    }
    if let Some(stem) = name.strip_suffix("-destination") {
        return session_at(stem).map(|s| ("destination", s));
    }
    name.strip_prefix("cpucheck-").and_then(session_at).map(|s| ("check", s))
}

fn source_outcome(s: SourceState) -> &'static str {
    match s {
        SourceState::Migrated => "migrated",
        SourceState::RolledBack => "rolled-back",
        SourceState::Lost => "lost",
        SourceState::InDoubt => "in-doubt",
        _ => "in-progress",
    }
}

fn destination_outcome(s: DestinationState) -> &'static str {
    match s {
        DestinationState::Committed => "migrated",
        DestinationState::Aborted => "aborted",
        DestinationState::Lost => "lost",
        DestinationState::CommitReceived => "in-doubt",
        DestinationState::Active | DestinationState::Held => "in-progress",
    }
}

/// Size of everything under `dir` (not following symbolic links).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    total
}

/// The newest modification time under `dir` (the directory itself included).
fn newest_change(dir: &Path) -> SystemTime {
    let mut newest = std::fs::metadata(dir).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if let Ok(m) = e.metadata() {
                if let Ok(t) = m.modified() {
                    newest = newest.max(t);
                }
                if m.is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
    newest
}

/// Pids of the processes with an open file or their working directory under any of `dirs`: `dir -> pids`.
fn users(dirs: &[PathBuf]) -> BTreeMap<PathBuf, Vec<i32>> {
    let mut out: BTreeMap<PathBuf, Vec<i32>> = BTreeMap::new();
    let inside = |p: &Path| dirs.iter().find(|d| p.starts_with(d)).cloned();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let mut hit = std::fs::read_link(e.path().join("cwd")).ok().and_then(|p| inside(&p));
        if hit.is_none() {
            for fd in std::fs::read_dir(e.path().join("fd")).into_iter().flatten().flatten() {
                if let Some(d) = std::fs::read_link(fd.path()).ok().and_then(|p| inside(&p)) {
                    hit = Some(d);
                    break;
                }
            }
        }
        if let Some(d) = hit {
            out.entry(d).or_default().push(pid);
        }
    }
    out
}

/// Every image set under `img_path`, oldest first, with its outcome from the journals in `state_dir`.
pub fn list(img_path: &Path, state_dir: &Path) -> Result<Vec<KeptSet>, KeptError> {
    // Resolved once: what /proc shows processes holding is resolved too.
    let img_path = &std::fs::canonicalize(img_path).unwrap_or_else(|_| img_path.to_path_buf());
    let rd = match std::fs::read_dir(img_path) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(KeptError::Read { dir: img_path.to_path_buf(), source }),
    };
    let (mut src, mut dst) = (BTreeMap::new(), BTreeMap::new());
    if state_dir.is_dir() {
        let j = Journals::open(state_dir)?;
        for r in j.list::<SourceJournal>()? {
            src.insert(r.session.clone(), r.state);
        }
        for r in j.list::<DestinationJournal>()? {
            dst.insert(r.session.clone(), r.state);
        }
    }
    let mut sets = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((side, session)) = parse_name(&name) else { continue };
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = e.path();
        let outcome = match side {
            "source" => src.get(&session).map(|s| source_outcome(*s)),
            "destination" => dst.get(&session).map(|s| destination_outcome(*s)),
            // A CPU check's scratch directory: a leftover once its session is over.
            _ => dst.get(&session).map(|s| match destination_outcome(*s) {
                "in-progress" => "in-progress",
                _ => "aborted",
            }),
        }
        .unwrap_or("unknown")
        .to_string();
        let protected = match outcome.as_str() {
            "in-doubt" => Some("its session is in doubt: `phaul resolve` may need these images".to_string()),
            "in-progress" => Some("its session is not settled (in progress, or held)".to_string()),
            // A session whose journal is not (yet) written, or a --state-dir that is not the one it used.
            "unknown" => Some(format!(
                "no journal of its session in {} (a session starting, or another --state-dir); --include-orphans removes such sets",
                state_dir.display()
            )),
            _ => None,
        };
        let age_s = SystemTime::now().duration_since(newest_change(&dir)).unwrap_or_default().as_secs();
        sets.push(KeptSet { bytes: tree_bytes(&dir), dir, side, session, age_s, outcome, protected });
    }
    let dirs: Vec<PathBuf> = sets.iter().map(|s| s.dir.clone()).collect();
    let in_use = users(&dirs);
    for s in &mut sets {
        if let Some(pids) = in_use.get(&s.dir) {
            let pids: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
            s.protected.get_or_insert_with(|| format!("in use by pid {}", pids.join(", ")));
        }
    }
    sets.sort_by_key(|s| std::cmp::Reverse(s.age_s));
    Ok(sets)
}

/// What a prune did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Pruned {
    pub removed: Vec<KeptSet>,
    /// Sets the rule selected that were left because they are protected.
    pub spared: Vec<KeptSet>,
    /// Directories that could not be removed, with why.
    pub failed: Vec<(PathBuf, String)>,
}

/// Which sets go: with `older_than`, every set at least that old; with `keep_failed`, the failed sets beyond
/// the newest N. A set with no journal (`unknown`) is protected unless `include_orphans` (then it goes by age, once an
/// hour old). Protected sets never go.
#[derive(Debug, Clone, Copy, Default)]
pub struct PruneRule {
    pub older_than: Option<Duration>,
    pub keep_failed: Option<usize>,
    pub dry_run: bool,
    /// Also sets without a journal (`unknown`), by age only, and only when at least an hour old.
    pub include_orphans: bool,
}

/// Orphans (no journal) younger than this are never pruned: their session may be starting.
const ORPHAN_GRACE: Duration = Duration::from_secs(3600);

pub fn prune(img_path: &Path, state_dir: &Path, rule: PruneRule) -> Result<Pruned, KeptError> {
    if !state_dir.is_dir() {
        return Err(KeptError::NoStateDir(state_dir.to_path_buf()));
    }
    let mut sets = list(img_path, state_dir)?;
    if rule.include_orphans {
        for s in &mut sets {
            if s.outcome == "unknown"
                && s.age_s >= ORPHAN_GRACE.as_secs()
                && s.protected.as_deref().is_some_and(|p| p.starts_with("no journal"))
            {
                s.protected = None;
            }
        }
    }
    let mut chosen: Vec<KeptSet> = Vec::new();
    if let Some(age) = rule.older_than {
        chosen.extend(sets.iter().filter(|s| s.age_s >= age.as_secs()).cloned());
    }
    if let Some(n) = rule.keep_failed {
        // `sets` is oldest first: all but the newest n failed ones.
        let failed: Vec<&KeptSet> = sets.iter().filter(|s| s.failed()).collect();
        let excess = failed.len().saturating_sub(n);
        for s in failed.into_iter().take(excess) {
            if !chosen.iter().any(|c| c.dir == s.dir) {
                chosen.push(s.clone());
            }
        }
    }
    let mut out = Pruned::default();
    for s in chosen {
        if s.protected.is_some() {
            out.spared.push(s);
        } else if rule.dry_run {
            out.removed.push(s);
        } else {
            match std::fs::remove_dir_all(&s.dir) {
                Ok(()) => out.removed.push(s),
                Err(e) => out.failed.push((s.dir.clone(), e.to_string())),
            }
        }
    }
    Ok(out)
}

/// `7d`, `12h`, `30m`, `45s` (or plain seconds).
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not an age; write it as 7d, 12h, 30m or 45s"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit is d, h, m or s")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journals;

    const S1: &str = "0123456789abcdef0123456789abcdef";
    const S2: &str = "fedcba9876543210fedcba9876543210";
    const S3: &str = "00000000000000000000000000000003";

    fn src_journal(session: &str, state: SourceState, dir: &Path) -> SourceJournal {
        SourceJournal {
            session: session.into(),
            state,
            htype: "pid".into(),
            id: "1".into(),
            handover: "overlap".into(),
            to: None,
            image_dir: dir.to_path_buf(),
            final_round: None,
            root: None,
            hold: None,
            guard_pid: None,
            tty_written_back: false,
            htype_options: Vec::new(),
            note: String::new(),
            updated_unix_ms: 0,
        }
    }

    #[test]
    fn names_ages_and_outcomes() {
        assert_eq!(parse_name(&format!("pid-42-{S1}-source")), Some(("source", S1.to_string())));
        assert_eq!(parse_name(&format!("lxc-web-{S1}-destination")), Some(("destination", S1.to_string())));
        assert_eq!(parse_name("my-notes"), None);
        assert_eq!(parse_name("pid-42-xyz-source"), None);
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_age("90"), Ok(Duration::from_secs(90)));
        assert!(parse_age("7w").is_err() && parse_age("soon").is_err());
    }

    #[test]
    fn prune_removes_failed_sets_and_never_an_in_doubt_or_busy_one() {
        let root = tempfile::tempdir().expect("tempdir");
        let (img, state) = (root.path().join("img"), root.path().join("state"));
        std::fs::create_dir_all(&img).expect("img");
        let j = Journals::open(&state).expect("journals");
        let mk = |session: &str, state: SourceState| {
            let d = img.join(format!("pid-1-{session}-source"));
            std::fs::create_dir_all(&d).expect("dir");
            std::fs::write(d.join("pages-1.img"), vec![0u8; 4096]).expect("file");
            let mut r = src_journal(session, state, &d);
            j.write(&mut r).expect("journal");
            d
        };
        let failed = mk(S1, SourceState::RolledBack);
        let doubt = mk(S2, SourceState::InDoubt);
        let busy = mk(S3, SourceState::RolledBack);
        let mine = img.join("my-notes");
        std::fs::create_dir_all(&mine).expect("not phaul's");
        let _open = std::fs::File::open(busy.join("pages-1.img")).expect("held open");

        let sets = list(&img, &state).expect("list");
        assert_eq!(sets.len(), 3, "{sets:?}");
        let by = |d: &Path| sets.iter().find(|s| s.dir == d).cloned().expect("listed");
        assert_eq!(by(&failed).outcome, "rolled-back");
        assert!(by(&failed).bytes >= 4096 && by(&failed).protected.is_none());
        assert_eq!(by(&doubt).outcome, "in-doubt");
        assert!(by(&doubt).protected.is_some());
        assert!(by(&busy).protected.as_deref().is_some_and(|p| p.contains(&std::process::id().to_string())));

        let orphan = img.join(format!("pid-9-{}-destination", "a".repeat(32)));
        std::fs::create_dir_all(&orphan).expect("a set with no journal");
        let dry =
            prune(&img, &state, PruneRule { older_than: Some(Duration::ZERO), dry_run: true, ..Default::default() })
                .expect("dry run");
        assert_eq!(dry.removed.len(), 1);
        assert!(failed.exists(), "a dry run removes nothing");
        let done =
            prune(&img, &state, PruneRule { older_than: Some(Duration::ZERO), ..Default::default() }).expect("prune");
        assert_eq!(done.removed.iter().map(|s| s.dir.clone()).collect::<Vec<_>>(), vec![failed.clone()]);
        assert_eq!(done.spared.len(), 3);
        assert!(!failed.exists() && doubt.exists() && busy.exists() && mine.exists() && orphan.exists());
        // Without the state directory nothing is pruned at all.
        let e = prune(
            &img,
            &root.path().join("nope"),
            PruneRule { older_than: Some(Duration::ZERO), ..Default::default() },
        );
        assert!(matches!(e, Err(KeptError::NoStateDir(_))));
        // Through a symbolic link to the image directory, a set in use is still seen in use.
        let link = root.path().join("img-link");
        std::os::unix::fs::symlink(&img, &link).expect("symlink");
        let via = list(&link, &state).expect("list");
        assert!(via.iter().any(|s| s.dir.ends_with(busy.file_name().expect("name")) && s.protected.is_some()));
    }

    #[test]
    fn keep_failed_keeps_the_newest_n() {
        let root = tempfile::tempdir().expect("tempdir");
        let (img, state) = (root.path().join("img"), root.path().join("state"));
        let j = Journals::open(&state).expect("journals");
        let mut dirs = Vec::new();
        for (i, s) in [S1, S2, S3].iter().enumerate() {
            let d = img.join(format!("pid-1-{s}-source"));
            std::fs::create_dir_all(&d).expect("dir");
            let t = SystemTime::now() - Duration::from_secs(1000 - i as u64 * 100);
            std::fs::File::open(&d).and_then(|f| f.set_modified(t)).expect("age");
            j.write(&mut src_journal(s, SourceState::RolledBack, &d)).expect("journal");
            dirs.push(d);
        }
        let done = prune(&img, &state, PruneRule { keep_failed: Some(1), ..Default::default() }).expect("prune");
        assert_eq!(done.removed.len(), 2);
        assert!(!dirs[0].exists() && !dirs[1].exists() && dirs[2].exists(), "the newest failed set stays");
    }
}
