# The driver groups phaul is installed and packaged in: one Debian package each (phaul, phaul-lxc, ...), read by
# scripts/install and scripts/package. The `phaul` group is the command and the core drivers and owns
# SYSCONFDIR/phaul/plugins.toml; every other group drops SYSCONFDIR/phaul/plugins.d/50-GROUP.toml.
#
# GROUP_LIBS[group]: the plugin libraries (cargo's lib names); GROUP_DEFAULTS[group]: "htype=fs" defaults written
# as [host-type.HTYPE] fs = "FS"; GROUP_DEPENDS[group]: Debian packages its drivers run; GROUP_SUMMARY[group].
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
declare -A GROUP_DEPENDS=(
  [phaul]="libc6 (>= 2.36), libgcc-s1, rsync, nftables, iproute2"
  [lxc]="lxc (>= 1:5.0), iptables"
  [btrfs]="btrfs-progs"
  [zfs]="zfsutils-linux | zfs-fuse"
  [lvm]="lvm2, thin-provisioning-tools"
)
declare -A GROUP_SUMMARY=(
  [phaul]="live migration of Linux process trees and containers, with CRIU"
  [lxc]="phaul host type for LXC containers"
  [btrfs]="phaul filesystem driver: btrfs send/receive rounds"
  [zfs]="phaul filesystem driver: ZFS send/receive rounds"
  [lvm]="phaul filesystem driver: LVM thin snapshots"
)
