//! Running LVM's tools and reading what they report.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use phaul_abi::{PluginError, PluginResult};

/// The tag on a snapshot the source took for this run: `phaul_snapshot_TOKEN`.
pub const SNAPSHOT_TAG: &str = "phaul_snapshot_";
/// The tag on a volume the destination is receiving: `phaul_receiving_TOKEN` (TOKEN starts with the receiving
/// process's pid).
pub const RECEIVING_TAG: &str = "phaul_receiving_";
/// The tag on a volume phaul received in a migration that succeeded.
pub const MIGRATED_TAG: &str = "phaul_migrated";
/// The tag on a source volume whose workload migrated away.
pub const MIGRATED_AWAY_TAG: &str = "phaul_migrated_away";

/// The tools, as found on this host.
#[derive(Debug, Clone)]
pub struct Tools {
    pub lvm: PathBuf,
    /// `--config TEXT` for every lvm command (`--fs-opt lvm-config=TEXT`), e.g. to turn udev off.
    pub config: Option<String>,
}

/// Runs `program args`; its stdout, or an error saying `what` failed with the tool's stderr.
pub fn run(program: &Path, args: &[&str], what: &str) -> PluginResult<String> {
    let what = format!("{what} ({} {})", program.display(), args.join(" "));
    phaul_fs_stream::kit::run_tool(program, args, &[("LVM_SUPPRESS_FD_WARNINGS", "1")], &what)
}

impl Tools {
    /// `lvm SUBCOMMAND [--config ...] ARGS`.
    pub fn lvm(&self, sub: &str, args: &[&str], what: &str) -> PluginResult<String> {
        let mut all = vec![sub];
        if let Some(c) = &self.config {
            all.push("--config");
            all.push(c);
        }
        all.extend_from_slice(args);
        run(&self.lvm, &all, what)
    }

    /// `lvs` rows of `fields` (comma-separated) for `select` (a VG, VG/LV, or empty for all), sizes in bytes.
    pub fn lvs(&self, fields: &str, select: &[&str], what: &str) -> PluginResult<Vec<Vec<String>>> {
        let mut args =
            vec!["--noheadings", "--nosuffix", "--units", "b", "--separator", "|", "--unbuffered", "-o", fields];
        args.extend_from_slice(select);
        let out = self.lvm("lvs", &args, what)?;
        let n = fields.split(',').count();
        Ok(out
            .lines()
            .map(|l| l.trim().split('|').map(|s| s.trim().to_string()).collect::<Vec<_>>())
            .filter(|r| r.len() == n)
            .collect())
    }

    /// One LV's row (`VG/LV`), or `None` when it does not exist.
    pub fn lv(&self, vg: &str, lv: &str, fields: &str) -> PluginResult<Option<Vec<String>>> {
        // Listing the whole VG: `lvs VG/LV` of a missing LV is an error indistinguishable from others.
        let mut f = String::from("lv_name,");
        f.push_str(fields);
        let rows = self.lvs(&f, &[vg], &format!("listing the volumes of {vg}"))?;
        Ok(rows.into_iter().find(|r| r[0] == lv).map(|mut r| r.split_off(1)))
    }

    /// The tags of `VG/LV` (empty when it has none or does not exist).
    pub fn tags(&self, vg: &str, lv: &str) -> PluginResult<Vec<String>> {
        Ok(self
            .lv(vg, lv, "lv_tags")?
            .and_then(|r| r.into_iter().next())
            .map(|t| t.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default())
    }

    /// A thin pool's size in bytes and how full its data and metadata are (percent).
    pub fn pool_usage(&self, vg: &str, pool: &str) -> PluginResult<PoolUsage> {
        let row = self
            .lv(vg, pool, "lv_size,data_percent,metadata_percent,segtype")?
            .ok_or_else(|| PluginError::not_found(format!("there is no thin pool {vg}/{pool} on this host")))?;
        if row[3] != "thin-pool" {
            return Err(PluginError::invalid(format!("{vg}/{pool} is a {} volume, not a thin pool", row[3])));
        }
        let pct = |s: &str| s.replace(',', ".").parse::<f64>().unwrap_or(0.0);
        Ok(PoolUsage { size: row[0].parse().unwrap_or(0), data_percent: pct(&row[1]), metadata_percent: pct(&row[2]) })
    }

    /// Removes `VG/LV` if it still carries `tag` (so that only what phaul made is ever removed).
    pub fn remove_tagged(&self, vg: &str, lv: &str, tag: &str) -> PluginResult<bool> {
        if !self.tags(vg, lv)?.iter().any(|t| t == tag) {
            return Ok(false);
        }
        let name = format!("{vg}/{lv}");
        self.lvm("lvremove", &["-y", "-f", &name], &format!("removing {name}"))?;
        Ok(true)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PoolUsage {
    pub size: u64,
    pub data_percent: f64,
    pub metadata_percent: f64,
}

impl PoolUsage {
    pub fn free(&self) -> u64 {
        let used = (self.size as f64 * self.data_percent / 100.0).ceil() as u64;
        self.size.saturating_sub(used)
    }
}

/// Device-mapper's name for `VG/LV` (each `-` in either doubled, joined by `-`).
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// Whether `name` may be an LV or VG name (LVM's characters, not `.`/`..`, not starting with `-`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c))
}

/// The device (major, minor) mounted at `dir` with its filesystem's root there, from a mountinfo text (of the
/// mounts at `dir`, the last one is what `dir` shows).
pub fn mounted_device(mountinfo: &str, dir: &Path) -> Option<(u32, u32)> {
    let dir = dir.to_string_lossy();
    let dir = dir.trim_end_matches('/');
    let line = mountinfo
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4).is_some_and(|p| p.replace("\\040", " ").trim_end_matches('/') == dir))?;
    let f: Vec<&str> = line.split(' ').collect();
    if *f.get(3)? != "/" {
        return None;
    }
    let (ma, mi) = f.get(2)?.split_once(':')?;
    Some((ma.parse().ok()?, mi.parse().ok()?))
}

/// Whether anything is mounted at `dir` (per a mountinfo text).
pub fn is_mount_point(mountinfo: &str, dir: &Path) -> bool {
    let dir = dir.to_string_lossy();
    let dir = dir.trim_end_matches('/');
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).any(|p| p.replace("\\040", " ").trim_end_matches('/') == dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_names_double_dashes() {
        assert_eq!(dm_name("vg-a", "pool"), "vg--a-pool");
        assert_eq!(dm_name("vg", "my-lv_tmeta"), "vg-my--lv_tmeta");
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("ct") && valid_name("ct.phaul-r1-123-ab-9") && valid_name("a+b_c"));
        assert!(!valid_name("") && !valid_name("..") && !valid_name("-x") && !valid_name("a/b") && !valid_name("a b"));
    }

    #[test]
    fn the_device_at_a_mount_point_is_found() {
        let mi = "22 1 0:20 / / rw - rootfs rootfs rw\n\
                  40 22 253:4 / /mnt/ct rw,relatime - ext4 /dev/mapper/vga-ct rw\n\
                  41 22 253:5 /sub /mnt/bind rw - ext4 /dev/mapper/vga-x rw\n\
                  42 22 0:30 / /mnt/my\\040dir rw - tmpfs tmpfs rw\n";
        assert_eq!(mounted_device(mi, Path::new("/mnt/ct")), Some((253, 4)));
        assert_eq!(mounted_device(mi, Path::new("/mnt/ct/")), Some((253, 4)));
        assert_eq!(mounted_device(mi, Path::new("/mnt/bind")), None, "a bind mount of a subdirectory");
        assert_eq!(mounted_device(mi, Path::new("/mnt")), None);
        assert!(is_mount_point(mi, Path::new("/mnt/my dir")));
        assert!(!is_mount_point(mi, Path::new("/mnt/other")));
    }

    #[test]
    fn pool_free_space() {
        let u = PoolUsage { size: 1000, data_percent: 25.5, metadata_percent: 1.0 };
        assert_eq!(u.free(), 745);
    }
}
