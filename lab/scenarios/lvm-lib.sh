# Shared by the lvm scenarios (fs-lvm, bench-fs-lvm): LVM without udev, the plugin list, host B's mount namespace,
# volumes, tree checksums, the return-trip migration. Sourced after lib.sh; not a scenario itself.
# LVM without udev (no udev in the guest): the tools make the device nodes themselves.
export LVM_SYSTEM_DIR=$LAB_WORK/lvm
mkdir -p "$LVM_SYSTEM_DIR" /run/lock/lvm /run/lvm
cat > "$LVM_SYSTEM_DIR/lvm.conf" <<'EOF'
devices { obtain_device_list_from_udev = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
global { use_lvmpolld = 0 }
backup { backup = 0 archive = 0 }
EOF
export PHAUL_PLUGINS=$LAB_WORK/plugins.toml
cat > "$PHAUL_PLUGINS" <<'EOF'
[[plugin]]
path = "/usr/local/lib/phaul/libphaul_htype_pid.so"

[[plugin]]
path = "/usr/local/lib/phaul/libphaul_fs_lvm.so"
EOF
[ -f /usr/local/lib/phaul/libphaul_fs_lvm.so ] || fail "libphaul_fs_lvm.so is not in the guest (cargo build --workspace --release)"
for t in lvm thin_delta thin_dump dmsetup mkfs.ext4 losetup; do
  command -v "$t" > /dev/null || fail "$t is not in the guest (lab/guest-packages)"
done

# run CMD...: CMD, its output on the console; fail if it fails.
run() { "$@" || fail "$* failed (exit $?)"; }

# make_vgs MIB: two "disks" of MIB (sparse files on loop devices), one VG each: vga (host A's), vgb (host B's).
make_vgs() {
  truncate -s "$1M" "$LAB_WORK/a.img" "$LAB_WORK/b.img"
  LOOPA=$(losetup -f --show "$LAB_WORK/a.img") || fail "losetup A"
  LOOPB=$(losetup -f --show "$LAB_WORK/b.img") || fail "losetup B"
  run pvcreate -q "$LOOPA" "$LOOPB"
  run vgcreate -q vga "$LOOPA"
  run vgcreate -q vgb "$LOOPB"
}

# B's mount namespace: a persistent one (bound to a file) where A's volumes are not mounted.
mkdir -p /run/lab-ns
mountpoint -q /run/lab-ns || { mount --bind /run/lab-ns /run/lab-ns && mount --make-private /run/lab-ns; }
touch /run/lab-ns/b
run unshare --mount=/run/lab-ns/b --propagation private true
# lib.sh's migrate starts `phaul serve` as `in_b lab-fd-accept ...`: serve's own options go at its end.
SERVE_OPTS=()
_in_b_ns() { nsenter --net=/run/netns/"$HOSTB" --mount=/run/lab-ns/b -- "$@"; }
in_b() {
  if [ "$1" = lab-fd-accept ]; then _in_b_ns "$@" "${SERVE_OPTS[@]}"; else _in_b_ns "$@"; fi
}

# new_volume NAME MIB MOUNTPOINT: an ext4 thin volume vga/NAME mounted at MOUNTPOINT in A (not in B).
new_volume() {
  run lvcreate -q -V "$2M" -T vga/pool -n "$1"
  run mkfs.ext4 -q -F "/dev/vga/$1"
  mkdir -p "$3"
  in_b mkdir -p "$3"
  run mount "/dev/vga/$1" "$3"
}

# tree_sums DIR: every entry under DIR with type/mode, owner, size, inode and content checksum, sorted.
tree_sums() {
  (cd "$1" && find . -xdev | LC_ALL=C sort | while read -r f; do
     s=$(stat -c '%f %u:%g %s %i' "$f")
     if [ -f "$f" ] && [ ! -L "$f" ]; then c=$(sha256sum < "$f" | cut -c1-16); else c=-; fi
     echo "$f $s $c"
   done)
}
export -f tree_sums

# vols VG: the thin volumes of VG with their tags ("name[tags]"); phaul_vols VG: those with a phaul tag of a
# migration under way or failed (not phaul_migrated*); snapshots_left VG: how many phaul snapshots are there.
vols() { lvs --noheadings --separator ' ' -o lv_name,lv_tags -S segtype=thin "$1" | awk '{ print $1 "[" $2 "]" }' | sort; }
phaul_vols() { lvs --noheadings -o lv_name,lv_tags "$1" | grep -E 'phaul_(receiving|snapshot)' || true; }
snapshots_left() { lvs --noheadings -o lv_name "$1" | grep -c 'phaul-r' || true; }

FAULT=$LAB_WORK/fault.json

# migrate_back NAME PID [ARGS...]: lib.sh's migrate the other way (fds transport): phaul serve in host A (the
# initial mount namespace) with BACK_SERVE_OPTS, phaul migrate pid PID in host B (B's network and mount
# namespaces). Sets MIGRATE_STATUS, SERVE_STATUS, MIGRATE_REPORT; logs in $LAB_WORK/NAME/.
migrate_back() {
  _m=$1 _m_pid=$2
  shift 2
  _mw=$LAB_WORK/$_m
  mkdir -p "$_mw/src-img" "$_mw/dst-img"
  _next_port; _p1=$_lab_port; _next_port; _p2=$_lab_port; _next_port; _p3=$_lab_port
  in_a lab-fd-accept 3 "$_p1" 4 "$_p2" 5 "$_p3" -- phaul --log-file "$_mw/serve.log" -v serve \
    --img-path "$_mw/dst-img" --rpid-dir "$_mw" --fdrpc 3 --fdmem 4 --fdfs 5 "${BACK_SERVE_OPTS[@]}" \
    > "$_mw/serve.out" 2> "$_mw/serve.err" &
  _serve=$!
  log "migrate_back $_m: phaul migrate pid $_m_pid $* (from B to A)"
  MIGRATE_STATUS=0
  _in_b_ns bash -c '
    deadline=$((SECONDS + 30))
    for fp in 3:$1 4:$2 5:$3; do
      until eval "exec ${fp%%:*}<>/dev/tcp/$0/${fp#*:}" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || { echo "lab: cannot connect to $0:${fp#*:}" >&2; exit 2; }
        sleep 0.05
      done
    done
    shift 3
    exec "$@" --fdrpc 3 --fdmem 4 --fdfs 5' "$HOSTA_ADDR" "$_p1" "$_p2" "$_p3" \
    phaul --log-file "$_mw/migrate.log" -v migrate pid "$_m_pid" --json --img-path "$_mw/src-img" "$@" \
    > "$_mw/report.json" 2> "$_mw/migrate.err" || MIGRATE_STATUS=$?
  SERVE_STATUS=0
  if wait_for 60 pid_gone_or_zombie "$_serve"; then wait "$_serve" || SERVE_STATUS=$?; else kill -9 "$_serve"; SERVE_STATUS=255; fi
  MIGRATE_REPORT=$_mw/report.json
  log "migrate_back $_m: phaul migrate exit $MIGRATE_STATUS, phaul serve exit $SERVE_STATUS"
  report "$_m" "$MIGRATE_REPORT" || true
  return "$MIGRATE_STATUS"
}

