# The driver groups phaul is installed and packaged in: one Debian package each (phaul, phaul-lxc, ...), read by
# scripts/install (which debian/rules runs once per package). The `phaul` group is the command and the core drivers and owns
# SYSCONFDIR/phaul/plugins.toml; every other group drops SYSCONFDIR/phaul/plugins.d/50-GROUP.toml.
#
# GROUP_LIBS[group]: the plugin libraries (cargo's lib names); GROUP_DEFAULTS[group]: "htype=fs" defaults written
# as [host-type.HTYPE] fs = "FS". The Debian packages' fields (what each group's drivers run) are in debian/control.
# shellcheck disable=SC2034
GROUPS_ALL=(phaul lxc btrfs zfs lvm)
declare -A GROUP_LIBS=(
  [phaul]="phaul_htype_pid phaul_fs_shared phaul_fs_external phaul_fs_rsync"
  [lxc]="phaul_htype_lxc"
  [btrfs]="phaul_fs_btrfs"
  [zfs]="phaul_fs_zfs"
  [lvm]="phaul_fs_lvm"
)
declare -A GROUP_DEFAULTS=(
  [phaul]="pid=shared"
  [lxc]="lxc=rsync"
  [btrfs]=""
  [zfs]=""
  [lvm]=""
)
