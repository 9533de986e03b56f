//! Which receive targets phaul may use and remove.
//!
//! A directory a filesystem driver receives into carries the extended attribute [`MARK`] while phaul owns it:
//! `receiving TOKEN` during a migration (TOKEN is the receiving run's), removed once the migration succeeded (the
//! directory is then the workload's, like any other). A source tree the workload left when it migrated away gets
//! `migrated-away`, so that a later migration back to this host may receive into it (rsync then moves only the
//! differences) without taking anything an operator made.
//!
//! [`claim`] applies the rule every receiver follows before anything is frozen: a target that does not exist is
//! created (and on roll-back removed whole); an empty directory (a mount point, say) is used (and on roll-back
//! emptied); a directory phaul marked is used (on roll-back a leftover of a failed run is removed, a tree left by
//! a migration away keeps its contents and mark); anything else is refused with a message naming it.

use std::io;
use std::path::{Path, PathBuf};

/// The extended attribute phaul's marks live in (`trusted.`: only root reads or writes it).
pub const MARK: &str = "trusted.phaul.owner";
/// The mark on a source tree whose workload migrated away.
pub const MIGRATED_AWAY: &str = "migrated-away";

/// How a target came to be phaul's, which decides what roll-back does with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// phaul created it: roll-back removes it.
    Created,
    /// It was an empty directory: roll-back empties it.
    WasEmpty,
    /// A leftover of an earlier receiving run (marked `receiving ...`): roll-back removes it.
    Leftover,
    /// A tree left by a migration away from this host: roll-back leaves its contents and puts its mark back.
    MigratedAway,
}

/// A target directory claimed for one receiving run.
#[derive(Debug)]
pub struct Target {
    pub path: PathBuf,
    pub claim: Claim,
    token: String,
}

/// What the mark on `path` says, if there is one.
pub fn read_mark(path: &Path) -> io::Result<Option<String>> {
    Ok(xattr::get(path, MARK)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Sets the mark.
pub fn set_mark(path: &Path, value: &str) -> io::Result<()> {
    xattr::set(path, MARK, value.as_bytes())
}

/// Removes the mark (no error when there is none).
pub fn clear_mark(path: &Path) -> io::Result<()> {
    match xattr::remove(path, MARK) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(61) => Ok(()), // ENODATA
        Err(e) => Err(e),
    }
}

/// Where a receiver may put each of the source's roots, from serve's options (`map=SOURCE-DIR=DESTINATION-DIR`,
/// repeatable; `allow=DIR`, repeatable: roots at or below DIR are received at the same path).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    maps: Vec<(String, String)>,
    allow: Vec<String>,
}

impl Placement {
    /// From the `map` and `allow` values; `driver` names the options in errors (`--fs-opt DRIVER:map=...`).
    pub fn new<'a>(
        maps: impl Iterator<Item = &'a str>,
        allow: impl Iterator<Item = &'a str>,
        driver: &str,
    ) -> Result<Placement, Refused> {
        let mut out = Placement::default();
        for m in maps {
            let (s, d) = m
                .split_once('=')
                .ok_or_else(|| Refused(format!("--fs-opt {driver}:map={m}: give SOURCE-DIR=DESTINATION-DIR")))?;
            if !Path::new(s).is_absolute() || !Path::new(d).is_absolute() {
                return Err(Refused(format!("--fs-opt {driver}:map={m}: both directories must be absolute")));
            }
            out.maps.push((s.to_string(), d.to_string()));
        }
        out.allow = allow.map(str::to_string).collect();
        Ok(out)
    }

    /// Where the source's root `src` is received, or `None` when serve's options do not allow it.
    pub fn target(&self, src: &str) -> Option<PathBuf> {
        let clean = |s: &str| s.trim_end_matches('/').to_string();
        if !Path::new(src).is_absolute() || Path::new(src).components().any(|c| c == std::path::Component::ParentDir) {
            return None;
        }
        let s = clean(src);
        if let Some((_, d)) = self.maps.iter().find(|(m, _)| clean(m) == s) {
            return Some(PathBuf::from(d));
        }
        self.allow
            .iter()
            .map(|a| clean(a))
            .find(|a| s == *a || s.starts_with(&format!("{a}/")) || a.is_empty())
            .map(|_| PathBuf::from(&s))
    }
}

/// A fresh token for one receiving run.
pub fn new_token() -> String {
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut b));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{:x}-{}", std::process::id(), u64::from_le_bytes(b), nanos % 1_000_000)
}

/// Why a target cannot be used.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The targets claimed by runs of this process (phaul serve runs sessions at once): a `receiving` mark may be a
/// dead run's leftover or a live run's target, and only this tells them apart.
fn in_use() -> &'static std::sync::Mutex<std::collections::HashSet<PathBuf>> {
    static IN_USE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<PathBuf>>> =
        std::sync::OnceLock::new();
    IN_USE.get_or_init(Default::default)
}

/// `path` written without `.`, `..` or repeated separators (the form the claim registry and the checks compare).
fn normal(path: &Path) -> PathBuf {
    path.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}

/// Claims `path` for a receiving run (see the module's rule), marking it `receiving TOKEN`. `hint` ends the
/// refusal message (which option picks another target). The path must be absolute, with no `..` and no symbolic
/// link among its directories (so that the place an operator allowed is the place written to), and not claimed
/// by another run of this process.
pub fn claim(path: &Path, token: &str, hint: &str) -> Result<Target, Refused> {
    let path = &normal(path);
    let shown = path.display();
    if !path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(Refused(format!("cannot receive into {shown}: the path must be absolute, without '..'")));
    }
    if let Some(parent) = path.parent() {
        match parent.canonicalize() {
            Ok(real) if real == parent => {}
            Ok(real) => {
                return Err(Refused(format!(
                    "cannot receive into {shown}: its parent directory is really {} (a symbolic link is on the way),                      and phaul receives only where the path itself leads; {hint}",
                    real.display()
                )))
            }
            Err(_) => {} // Missing: reported below.
        }
    }
    {
        let mut used = in_use().lock().unwrap_or_else(|p| p.into_inner());
        if used.contains(path) {
            return Err(Refused(format!(
                "cannot receive into {shown}: another migration into this host is receiving into it now; {hint}"
            )));
        }
        used.insert(path.clone());
    }
    let r = claim_unlisted(path, token, hint);
    if r.is_err() {
        in_use().lock().unwrap_or_else(|p| p.into_inner()).remove(path);
    }
    r
}

fn claim_unlisted(path: &Path, token: &str, hint: &str) -> Result<Target, Refused> {
    let shown = path.display();
    let claim = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = path.parent().unwrap_or(Path::new("/"));
            if !parent.is_dir() {
                return Err(Refused(format!(
                    "cannot receive into {shown}: its parent directory {} does not exist on this host; {hint}",
                    parent.display()
                )));
            }
            std::fs::create_dir(path).map_err(|e| Refused(format!("cannot create {shown}: {e}")))?;
            Claim::Created
        }
        Err(e) => return Err(Refused(format!("cannot look at {shown}: {e}"))),
        Ok(m) if !m.is_dir() => {
            return Err(Refused(format!("cannot receive into {shown}: it exists and is not a directory; {hint}")))
        }
        Ok(_) => match read_mark(path).map_err(|e| Refused(format!("cannot read the marks of {shown}: {e}")))? {
            Some(m) if m.starts_with("receiving ") => Claim::Leftover,
            Some(m) if m == MIGRATED_AWAY => Claim::MigratedAway,
            _ => {
                let empty =
                    std::fs::read_dir(path).map_err(|e| Refused(format!("cannot list {shown}: {e}")))?.next().is_none();
                if !empty {
                    return Err(Refused(format!(
                        "{shown} already exists on this host and phaul did not make it (it holds files and has no \
                         {MARK} mark); phaul never receives over someone else's data: move it away, or {hint}"
                    )));
                }
                Claim::WasEmpty
            }
        },
    };
    set_mark(path, &format!("receiving {token}"))
        .map_err(|e| Refused(format!("cannot mark {shown} as phaul's (extended attribute {MARK}): {e}")))?;
    Ok(Target { path: path.to_path_buf(), claim, token: token.to_string() })
}

/// Mount points strictly below `path` in this process's mount namespace (from /proc/self/mountinfo).
fn mounts_below(path: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let unescape = |f: &str| {
        let mut out = String::new();
        let b = f.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 3 < b.len() {
                if let Ok(v) = u8::from_str_radix(&f[i + 1..i + 4], 8) {
                    out.push(v as char);
                    i += 4;
                    continue;
                }
            }
            out.push(b[i] as char);
            i += 1;
        }
        PathBuf::from(out)
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|m| m != path && m.starts_with(path))
        .collect()
}

/// Refuses to remove anything under `path` while a filesystem is mounted inside it: removing would reach
/// through the mount into data that is not phaul's.
fn no_mounts_below(path: &Path) -> io::Result<()> {
    let m = mounts_below(path);
    if m.is_empty() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{} has filesystems mounted inside it ({}); phaul removes nothing through a mount: unmount them, then \
         remove {} by hand",
        path.display(),
        m.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        path.display()
    )))
}

fn empty_dir(path: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if std::fs::symlink_metadata(&p)?.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

impl Drop for Target {
    fn drop(&mut self) {
        in_use().lock().unwrap_or_else(|p| p.into_inner()).remove(&self.path);
    }
}

impl Target {
    /// Puts this run's mark back on the target (after a session, in case what was received carried a mark of
    /// its own on the root).
    pub fn reassert(&self) -> io::Result<()> {
        set_mark(&self.path, &format!("receiving {}", self.token))
    }

    /// Whether the mark still says this run owns it (a target another run took over is left alone).
    fn still_ours(&self) -> bool {
        matches!(read_mark(&self.path), Ok(Some(m)) if m == format!("receiving {}", self.token))
    }

    /// The migration succeeded: the tree is the workload's now; the mark goes.
    pub fn keep(&self) -> io::Result<()> {
        if self.still_ours() {
            clear_mark(&self.path)?;
        }
        Ok(())
    }

    /// The migration rolled back: undo what this run did to the target (see [`Claim`]).
    pub fn roll_back(&self) -> io::Result<()> {
        if !self.still_ours() {
            log::warn!("{} is no longer marked as this run's; leaving it", self.path.display());
            return Ok(());
        }
        if matches!(self.claim, Claim::Created | Claim::Leftover | Claim::WasEmpty) {
            no_mounts_below(&self.path)?;
        }
        match self.claim {
            Claim::Created | Claim::Leftover => match std::fs::remove_dir_all(&self.path) {
                Ok(()) => Ok(()),
                // A mount point: its contents are gone, the directory stays.
                Err(e) if e.raw_os_error() == Some(16) => {
                    empty_dir(&self.path)?;
                    clear_mark(&self.path)
                }
                Err(e) => Err(e),
            },
            Claim::WasEmpty => {
                empty_dir(&self.path)?;
                clear_mark(&self.path)
            }
            Claim::MigratedAway => set_mark(&self.path, MIGRATED_AWAY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn a_missing_target_is_created_and_removed_on_roll_back() {
        let d = tmp();
        let t = claim(&d.path().join("new"), "t1", "x").expect("claim");
        assert_eq!(t.claim, Claim::Created);
        std::fs::write(t.path.join("f"), "x").expect("write");
        t.roll_back().expect("roll back");
        assert!(!d.path().join("new").exists());
    }

    #[test]
    fn a_target_behind_a_symlink_or_in_use_is_refused() {
        let d = tmp();
        std::fs::create_dir(d.path().join("real")).expect("dir");
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).expect("symlink");
        let e = claim(&d.path().join("link/t"), "t1", "x").expect_err("refused");
        assert!(e.0.contains("symbolic link"), "{e}");
        assert!(!d.path().join("real/t").exists());
        let t = claim(&d.path().join("busy"), "t1", "x").expect("claim");
        let e = claim(&d.path().join("busy"), "t2", "x").expect_err("refused while in use");
        assert!(e.0.contains("another migration"), "{e}");
        t.roll_back().expect("roll back");
        drop(t);
        let again = claim(&d.path().join("busy"), "t3", "x").expect("free again");
        again.roll_back().expect("roll back");
    }

    #[test]
    fn roots_are_received_only_where_serve_allows() {
        let p = Placement::new(["/srv/a=/data/a"].into_iter(), ["/var/lib/machines"].into_iter(), "rsync")
            .expect("placement");
        assert_eq!(p.target("/srv/a/"), Some(PathBuf::from("/data/a")));
        assert_eq!(p.target("/var/lib/machines/c1"), Some(PathBuf::from("/var/lib/machines/c1")));
        assert_eq!(p.target("/var/lib/machinesX"), None);
        assert_eq!(p.target("/etc"), None);
        assert_eq!(p.target("/var/lib/machines/../../etc"), None);
        assert!(Placement::new(["relative=/x"].into_iter(), std::iter::empty(), "rsync").is_err());
    }

    #[test]
    fn roll_back_never_reaches_through_a_mount() {
        let d = tmp();
        let t = claim(&d.path().join("new"), "t1", "x").expect("claim");
        let inner = t.path.join("mnt");
        std::fs::create_dir(&inner).expect("mkdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "phaul-mark-test"])
            .arg(&inner)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (not root?)");
            return;
        }
        std::fs::write(inner.join("not-phauls"), "keep").expect("write");
        let e = t.roll_back().expect_err("refused while a filesystem is mounted inside");
        assert!(e.to_string().contains("mounted inside"), "{e}");
        assert!(inner.join("not-phauls").exists(), "roll-back removed data through a mount");
        let _ = std::process::Command::new("umount").arg(&inner).status();
        t.roll_back().expect("roll back once unmounted");
        assert!(!d.path().join("new").exists());
    }

    #[test]
    fn someone_elses_tree_is_refused_and_untouched() {
        let d = tmp();
        std::fs::write(d.path().join("precious"), "data").expect("write");
        let e = claim(d.path(), "t1", "pass another").expect_err("refused");
        assert!(e.0.contains("phaul did not make it") && e.0.contains("pass another"), "{e}");
        assert_eq!(std::fs::read_to_string(d.path().join("precious")).expect("read"), "data");
        assert_eq!(read_mark(d.path()).expect("mark"), None);
    }

    #[test]
    fn an_empty_dir_is_emptied_not_removed_and_a_migrated_away_tree_is_kept() {
        let d = tmp();
        let t = claim(d.path(), "t1", "x").expect("claim");
        assert_eq!(t.claim, Claim::WasEmpty);
        std::fs::create_dir(t.path.join("sub")).expect("mkdir");
        t.roll_back().expect("roll back");
        assert!(d.path().exists() && std::fs::read_dir(d.path()).expect("ls").next().is_none());
        assert_eq!(read_mark(d.path()).expect("mark"), None);
        drop(t);

        std::fs::write(d.path().join("old"), "left behind").expect("write");
        set_mark(d.path(), MIGRATED_AWAY).expect("mark");
        let t = claim(d.path(), "t2", "x").expect("claim");
        assert_eq!(t.claim, Claim::MigratedAway);
        t.roll_back().expect("roll back");
        assert!(d.path().join("old").exists());
        assert_eq!(read_mark(d.path()).expect("mark").as_deref(), Some(MIGRATED_AWAY));
        drop(t);
        let t = claim(d.path(), "t3", "x").expect("claim");
        t.keep().expect("keep");
        assert_eq!(read_mark(d.path()).expect("mark"), None);
    }
}
