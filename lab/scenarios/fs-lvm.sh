# fs-lvm: the lvm filesystem driver on real LVM thin volumes (device-mapper exists only in this kernel). Host A's
# workload (tree-writer) keeps changing an ext4 filesystem on the thin volume vga/ct mounted at /mnt/ct; host B is
# its network namespace plus a mount namespace of its own (where A's /mnt/ct is not mounted) and the volume group
# vgb with a thin pool. Cells:
#   ok        --fs lvm, stop-and-copy: a full round, delta rounds, the frozen one; at the destination's restore
#             reply (both copies held) B's tree equals A's (content, modes, owners, sizes, inode numbers); the
#             workload runs on in B's vgb/ct (mounted at /mnt/ct in B), A's vga/ct stays (tagged
#             phaul_migrated_away, untouched since the freeze), no phaul snapshot is left in either VG.
#   back      the return trip (B -> A) onto the volume the workload left on A is refused, saying why, as round 1
#             plans the volume; with --fs-opt lv=VG/LV on the source, already as the destination is set up (no
#             round ran); the workload runs on in B.
#   small     B's pool (vgb/small, 16 MiB) cannot hold A's 40 MiB volume: refused by round 1's plan (no block sent)
#             with a message naming the pool, the workload runs on in A, nothing of phaul's is left in either VG.
#   nozero    B's pool does not zero new blocks (-Zn): refused as the destination is set up.
#   restart   --mode restart with the cmd fixture host type (a shell counter): stopped on A, the frozen round, started
#             on B on B's volume, where it counts on; A's files stay as they were at the stop.
#   killed    phaul serve is killed (SIGKILL, by pid) as round 2 starts: the workload runs on in A, A's snapshots
#             are gone; B keeps the half-received volume, tagged phaul_receiving_<dead pid>...; a second
#             migration (phaul's default mode: pre-copy here) removes that leftover and succeeds.
# Takes 80-160 s in the guest (LVM's tools are slow under TCG).
. "$LAB/scenarios/lib.sh"

. "$LAB/scenarios/lvm-lib.sh"

# Two "disks", one VG each, each with a thin pool.
make_vgs 320
run lvcreate -q -L 200M -T vga/pool
run lvcreate -q -L 160M -T vgb/pool
run lvcreate -q -L 16M -T vgb/small

# ---- ok ---------------------------------------------------------------------------------------------------------
new_volume ct 128 /mnt/ct
start_workload tree-writer ct --dir /mnt/ct
wait_for 60 test -e /mnt/ct/data/n12 || fail "ok: the tree-writer does not write"
# Some bulk data, so that round 1 is a real copy (4 MiB of random bytes).
run dd if=/dev/urandom of=/mnt/ct/bulk bs=1M count=4 status=none
sync

# At the destination's restore reply, compare the trees: A's (frozen) and B's (held, not yet resumed).
rm -f "$FAULT"
(
  for _i in $(seq 1 1800); do [ -s "$FAULT" ] && break; sleep 0.1; done
  [ -s "$FAULT" ] || exit 0
  tree_sums /mnt/ct > "$LAB_WORK/ok-a.sums" 2>&1
  _in_b_ns bash -c 'tree_sums /mnt/ct' > "$LAB_WORK/ok-b.sums" 2>&1
  _in_b_ns grep ' /mnt/ct ' /proc/self/mountinfo > "$LAB_WORK/ok-b.mount"
  kill -CONT "$(jq -r .pid "$FAULT")"
) &
watcher=$!
SERVE_OPTS=(--fs-opt lvm:vg=vgb --fs-opt lvm:pool=pool --fs-opt lvm:allow=/mnt)
export PHAUL_TEST_FAULT_AT=dst:send:RestoreReply PHAUL_TEST_FAULT_FILE=$FAULT
migrate ok "$WORKLOAD_PID" --fs lvm --htype-opt root=/mnt/ct --pre-dump off --timeout 120 ||
  fail "ok: phaul migrate exited $MIGRATE_STATUS (serve $SERVE_STATUS)"
unset PHAUL_TEST_FAULT_AT PHAUL_TEST_FAULT_FILE
wait "$watcher"
[ "$SERVE_STATUS" = 0 ] || fail "ok: phaul serve exited $SERVE_STATUS"
expect_json "$MIGRATE_REPORT" '.outcome == "migrated"'
expect_json "$MIGRATE_REPORT" '.fs_rounds >= 2' "ok: fewer than two filesystem rounds"
expect_json "$MIGRATE_REPORT" '.fs_round_list[0].bytes > 4000000' "ok: round 1 did not send the 4 MiB of bulk data"
expect_json "$MIGRATE_REPORT" '.fs_round_list[-1].frozen and .fs_round_list[-1].bytes < .fs_round_list[0].bytes' \
  "ok: the frozen round is not a smaller delta"
jq -r '.fs_round_list[] | "  fs round \(.round)\(if .frozen then " (frozen)" else "" end): \(.bytes) bytes, \(.duration_ms) ms"' "$MIGRATE_REPORT"
grep -ho 'lvm round [0-9]*: [^ ]*: snapshot.*' "$LAB_WORK/ok/migrate.log" | sed 's/^/  /'
[ -s "$LAB_WORK/ok-a.sums" ] || fail "ok: the trees were not compared (the restore reply was never reached)"
grep -q vgb-ct "$LAB_WORK/ok-b.mount" || fail "ok: B's /mnt/ct is not vgb/ct: $(cat "$LAB_WORK/ok-b.mount")"
if ! cmp -s "$LAB_WORK/ok-a.sums" "$LAB_WORK/ok-b.sums"; then
  diff "$LAB_WORK/ok-a.sums" "$LAB_WORK/ok-b.sums" | head -20
  fail "ok: B's tree differs from A's at the freeze"
fi
log "ok: B's tree equals A's at the freeze ($(wc -l < "$LAB_WORK/ok-a.sums") entries, inode numbers included)"
wait_for 20 pid_gone "$WORKLOAD_PID" || fail "ok: the source pid $WORKLOAD_PID still exists"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 120 || fail "ok: the restored workload is not ok"
n=$(printf '%s' "$PROBE_STATE" | jq -r .tree_ops)
# Every tick appends its number to open.log: B's must grow past the probe, A's must not (A's volume is as it was
# at the freeze).
wait_for 30 _in_b_ns grep -qx "$((n + 3))" /mnt/ct/open.log || fail "ok: the workload does not write on in B"
grep -qx "$((n + 3))" /mnt/ct/open.log && fail "ok: the restored workload wrote into A's volume"
[ "$(snapshots_left vga)" = 0 ] && [ "$(snapshots_left vgb)" = 0 ] ||
  fail "ok: snapshots left: $(lvs --noheadings -o vg_name,lv_name | grep phaul-r)"
lvs --noheadings -o lv_tags vga/ct | grep -q phaul_migrated_away || fail "ok: A's vga/ct is not tagged migrated away"
tags_b=$(lvs --noheadings -o lv_tags vgb/ct) || fail "ok: B has no vgb/ct"
case "$tags_b" in *phaul_migrated*) ;; *) fail "ok: vgb/ct is tagged '$tags_b', not phaul_migrated" ;; esac
case "$tags_b" in *phaul_receiving*) fail "ok: vgb/ct still carries a receiving tag: $tags_b" ;; esac
log "ok: A: $(vols vga | xargs); B: $(vols vgb | xargs)"

# ---- back: the return trip B -> A is refused, saying why ------------------------------------------------------------
# A's operator unmounted the volume the workload left (the driver never mounts over a mounted filesystem); the
# volume itself, tagged phaul_migrated_away, is still there: the lvm driver does not write over it.
run umount /mnt/ct
BACK_SERVE_OPTS=(--fs-opt lvm:vg=vga --fs-opt lvm:allow=/mnt)
migrate_back back "$RESTORED_PID" --fs lvm --htype-opt root=/mnt/ct --pre-dump off --timeout 60 &&
  fail "back: the migration back onto A's old volume succeeded"
grep -q "migrated away from this host" "$LAB_WORK/back/migrate.err" "$LAB_WORK/back/serve.log" ||
  fail "back: no message says why: $(tail -3 "$LAB_WORK/back/migrate.err")"
log "back: refused: $(grep -ho 'vga/ct is the volume[^;]*' "$LAB_WORK/back/migrate.err" "$LAB_WORK/back/serve.log" | head -1)"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 60 || fail "back: the workload does not run on in B"
# With the volume named on the source (--fs-opt lv=VG/LV) the destination refuses as it is set up, before any
# round (and before any pre-dump froze the workload).
migrate_back back-named "$RESTORED_PID" --fs lvm --fs-opt lv=vgb/ct --htype-opt root=/mnt/ct --timeout 60 &&
  fail "back-named: the migration back onto A's old volume succeeded"
grep -q "migrated away from this host" "$LAB_WORK/back-named/migrate.err" "$LAB_WORK/back-named/serve.log" ||
  fail "back-named: no message says why: $(tail -3 "$LAB_WORK/back-named/migrate.err")"
expect_json "$MIGRATE_REPORT" '(.fs_rounds // 0) == 0 and ([.rounds[]?] | length) == 0' \
  "back-named: a round ran before the refusal"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 60 || fail "back-named: the workload does not run on in B"
[ "$(snapshots_left vga)" = 0 ] && [ "$(snapshots_left vgb)" = 0 ] || fail "back: snapshots left"
lvs --noheadings -o lv_tags vga/ct | grep -q phaul_migrated_away || fail "back: A's vga/ct changed its tags"
kill -9 "$RESTORED_PID" 2>/dev/null

# ---- small: B's pool cannot take it ----------------------------------------------------------------------------
new_volume ct2 64 /mnt/ct2
run dd if=/dev/urandom of=/mnt/ct2/bulk bs=1M count=40 status=none
sync
start_workload tree-writer ct2 --dir /mnt/ct2
SERVE_OPTS=(--fs-opt lvm:vg=vgb --fs-opt lvm:pool=small --fs-opt lvm:allow=/mnt)
migrate small "$WORKLOAD_PID" --fs lvm --htype-opt root=/mnt/ct2 --pre-dump off --timeout 120 &&
  fail "small: the migration into a 16 MiB pool succeeded"
grep -q "thin pool vgb/small" "$LAB_WORK/small/migrate.err" "$LAB_WORK/small/migrate.log" "$MIGRATE_REPORT" ||
  fail "small: no message names the pool: $(tail -3 "$LAB_WORK/small/migrate.err")"
log "small: refused: $(grep -ho 'the thin pool vgb/small[^;]*' "$LAB_WORK/small/migrate.err" "$MIGRATE_REPORT" | head -1)"
# Refused by round 1's plan: no block was read or sent (the stream reports progress from its first block).
grep -q "progress of lvm round" "$LAB_WORK/small/migrate.log" && fail "small: blocks travelled before the refusal"
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 60 || fail "small: the workload does not run on in A"
[ "$(snapshots_left vga)" = 0 ] || fail "small: snapshots left in vga"
[ -z "$(phaul_vols vgb)" ] && ! lvs vgb/ct2 > /dev/null 2>&1 || fail "small: phaul left in vgb: $(phaul_vols vgb)"
_in_b_ns test -e /mnt/ct2/data && fail "small: B's /mnt/ct2 holds data"

# ---- nozero: B's pool does not zero new blocks: refused as the destination is set up ---------------------------
run lvcreate -q -L 64M -T vgb/nozero -Zn
SERVE_OPTS=(--fs-opt lvm:vg=vgb --fs-opt lvm:pool=nozero --fs-opt lvm:allow=/mnt)
migrate nozero "$WORKLOAD_PID" --fs lvm --htype-opt root=/mnt/ct2 --pre-dump off --timeout 60 &&
  fail "nozero: the migration into a pool that does not zero new blocks succeeded"
grep -q "does not zero newly provisioned blocks" "$LAB_WORK/nozero/migrate.err" "$LAB_WORK/nozero/serve.log" ||
  fail "nozero: no message says why: $(tail -3 "$LAB_WORK/nozero/migrate.err")"
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 60 || fail "nozero: the workload does not run on in A"
[ -z "$(phaul_vols vgb)" ] || fail "nozero: phaul left in vgb: $(phaul_vols vgb)"
log "nozero: refused: $(grep -ho 'the thin pool vgb/nozero[^:]*' "$LAB_WORK/nozero/migrate.err" | head -1)"
run lvremove -q -y vgb/nozero
kill -9 "$WORKLOAD_PID"

# ---- killed: serve dies as round 2 starts --------------------------------------------------------------------------
new_volume ct3 64 /mnt/ct3
run dd if=/dev/urandom of=/mnt/ct3/bulk bs=1M count=4 status=none
start_workload tree-writer ct3 --dir /mnt/ct3
rm -f "$FAULT"
( for _i in $(seq 1 1800); do [ -s "$FAULT" ] && break; sleep 0.1; done
  [ -s "$FAULT" ] && kill -9 "$(jq -r .pid "$FAULT")" ) &
watcher=$!
SERVE_OPTS=(--fs-opt lvm:vg=vgb --fs-opt lvm:pool=pool --fs-opt lvm:allow=/mnt)
export PHAUL_TEST_FAULT_AT='dst:recv:FsRoundStart#2' PHAUL_TEST_FAULT_FILE=$FAULT
migrate killed "$WORKLOAD_PID" --fs lvm --htype-opt root=/mnt/ct3 --pre-dump off --timeout 60 --link-timeout 5 &&
  fail "killed: the migration succeeded although serve was killed"
unset PHAUL_TEST_FAULT_AT PHAUL_TEST_FAULT_FILE
wait "$watcher"
[ -s "$FAULT" ] || fail "killed: phaul serve never reached round 2"
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 60 || fail "killed: the workload does not run on in A"
wait_for 10 test "$(snapshots_left vga)" = 0 || fail "killed: snapshots left in vga: $(lvs --noheadings -o lv_name vga)"
left=$(lvs --noheadings -o lv_tags vgb/ct3 2>/dev/null)
case "$left" in *phaul_receiving_*) log "killed: B keeps the leftover vgb/ct3 [$left]" ;;
  *) fail "killed: vgb/ct3 should be a tagged leftover, is '$left'" ;; esac
# Again, in phaul's default mode (pre-copy on this kernel: filesystem rounds alongside memory rounds).
migrate killed-again "$WORKLOAD_PID" --fs lvm --htype-opt root=/mnt/ct3 --timeout 120 ||
  fail "killed-again: phaul migrate exited $MIGRATE_STATUS (serve $SERVE_STATUS)"
expect_json "$MIGRATE_REPORT" '.outcome == "migrated"'
probe "$RESTORED_PID" "$WORKLOAD_STATE" 120 || fail "killed-again: the restored workload is not ok"
grep -q "leftover" "$LAB_WORK/killed-again/serve.log" || fail "killed-again: serve did not remove the leftover"
[ "$(snapshots_left vga)" = 0 ] && [ "$(snapshots_left vgb)" = 0 ] || fail "killed-again: snapshots left"
log "final: A: $(vols vga | xargs); B: $(vols vgb | xargs)"

# ---- restart: --mode restart with the cmd fixture host type (a shell counter in /mnt/ct4) ----------------------
new_volume ct4 64 /mnt/ct4
cat > /mnt/ct4/counter.sh <<'EOF'
n=$(cat count 2>/dev/null || echo 0)
trap 'exit 0' TERM
while :; do n=$((n + 1)); echo "$n" > count.new && mv count.new count; sleep 0.05; done
EOF
echo 'exec /bin/sh ./counter.sh' > /mnt/ct4/command
in_a bash -c 'cd /mnt/ct4 && { /bin/sh ./counter.sh < /dev/null > /dev/null 2>&1 & echo $! > /mnt/ct4/pid; }'
old=$(cat /mnt/ct4/pid)
wait_for 10 test -s /mnt/ct4/count || fail "restart: the counter does not count"
cat > "$LAB_WORK/plugins-cmd.toml" <<'EOF'
[[plugin]]
path = "/usr/local/lib/phaul/libphaul_fixture_plugin_restartable.so"

[[plugin]]
path = "/usr/local/lib/phaul/libphaul_fs_lvm.so"
EOF
SERVE_OPTS=(--fs-opt lvm:vg=vgb --fs-opt lvm:pool=pool --fs-opt lvm:allow=/mnt)
PHAUL_PLUGINS=$LAB_WORK/plugins-cmd.toml LAB_TARGET="cmd counter" \
  migrate restart "$old" --mode restart --htype-opt dir=/mnt/ct4 --fs lvm --timeout 120 ||
  fail "restart: phaul migrate exited $MIGRATE_STATUS (serve $SERVE_STATUS)"
expect_json "$MIGRATE_REPORT" '.mode == "restart" and .fs_round_list[-1].frozen'
wait_for 20 pid_gone "$old" || fail "restart: the counter still runs on A"
before=$(cat /mnt/ct4/count)
wait_for 20 _in_b_ns sh -c "[ \$(cat /mnt/ct4/count) -gt $before ]" || fail "restart: the counter does not go on in B"
[ "$(cat /mnt/ct4/count)" = "$before" ] || fail "restart: A's files changed after the stop"
log "restart: the counter stopped at $before on A and counts on in B ($(_in_b_ns cat /mnt/ct4/count))"
kill -9 "$(_in_b_ns cat /mnt/ct4/pid)" 2>/dev/null
[ "$(snapshots_left vga)" = 0 ] && [ "$(snapshots_left vgb)" = 0 ] || fail "restart: snapshots left"

