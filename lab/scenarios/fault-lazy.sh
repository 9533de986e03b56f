# fault-lazy: the fault-injection cells of the post-copy and hybrid handovers (lazy pages exist only on this
# kernel). Each cell stops one phaul at a protocol step (phaul's test hook: PHAUL_TEST_FAULT_AT / _FILE), kills a
# process or cuts the link there, and checks the invariant afterwards: exactly one copy exists (or, after the
# commit, the workload is reported lost on both sides with nothing left on the destination), at most one ever ran
# (the workload's heartbeat names its host: the host changes at most once and never back), and the message says
# what happened.
. "$LAB/scenarios/lib.sh"

FAULT=$LAB_WORK/fault.json

# fault_watch ACTION: in the background, wait for the hook's report, then act: `kill` (SIGKILL the stopped phaul),
# `kill-criu` (SIGKILL the CRIU it drives, then continue it), `cut-after N` (continue it, then after N seconds take
# host B's veth down).
fault_watch() {
  (
    for _i in $(seq 1 600); do [ -s "$FAULT" ] && break; sleep 0.1; done
    [ -s "$FAULT" ] || exit 0
    _fp=$(jq -r .pid "$FAULT")
    case "$1" in
      kill) kill -9 "$_fp" ;;
      kill-criu) for _c in $(jq -r '.criu_pids[]' "$FAULT"); do kill -9 "$_c"; done; kill -CONT "$_fp" ;;
      cut-after) kill -CONT "$_fp"; sleep "$2"; in_b ip link set veth-b down ;;
    esac
  ) &
  FAULT_WATCHER=$!
}

# heartbeat_ok FILE: the host changed at most once and never back; beats only increase. A line whose address is
# `none` comes from a copy whose host has no route to the probe (host B once its link is cut): it names no host.
heartbeat_ok() {
  awk '
    { if (NR > 1 && $2 <= beat) { print "beat " $2 " after " beat; bad = 1; exit 1 }
      beat = $2
      if ($1 == "none") next
      if ($1 != host) { changes++; if (seen[$1]) { print "host " $1 " again"; bad = 1; exit 1 }; seen[$1] = 1; host = $1 } }
    END { if (!bad && changes > 2) { print changes " host changes"; exit 1 } }' "$1"
}

nothing_on_b() { [ -z "$(ip netns pids "$HOSTB")" ]; }

# cell NAME POINT ACTION ARGS...: a fresh 32 MiB workload with a heartbeat, one migration with the fault.
cell() {
  _c=$1 _point=$2 _action=$3
  shift 3
  rm -f "$FAULT"
  start_workload memory "$_c" --size-mib 32 --dirty-mib-s "${CELL_DIRTY:-0}" --heartbeat "$LAB_WORK/$_c.hb"
  probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "$_c: the workload is not ok before the migration"
  fault_watch $_action
  export PHAUL_TEST_FAULT_AT=$_point PHAUL_TEST_FAULT_FILE=$FAULT
  migrate "$_c" "$WORKLOAD_PID" --timeout 60 --max-frozen 40 --resolve-timeout 5 --link-timeout 5 "$@" || true
  unset PHAUL_TEST_FAULT_AT PHAUL_TEST_FAULT_FILE
  wait "$FAULT_WATCHER" 2>/dev/null || true
  [ -s "$FAULT" ] || fail "$_c: phaul never reached $_point"
  in_b ip link set veth-b up 2>/dev/null || true
}

# The destination's phaul dies while CRIU holds its restored copy, before the commit: CRIU kills that copy, and its
# lazy-pages daemon ends its page transfer "successfully"; the source's relay must not let that end reach the
# source's CRIU (which would kill the source's tree): the source resumes its copy.
cell dst-dies-held dst:notify:post-restore kill --mode lazy
[ "$MIGRATE_STATUS" = 1 ] || fail "dst-dies-held: phaul migrate exited $MIGRATE_STATUS, not 1 (rolled back)"
wait_for 30 probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 20 || fail "dst-dies-held: the workload does not run on A"
wait_for 20 nothing_on_b || fail "dst-dies-held: processes left on B: $(ip netns pids "$HOSTB")"
heartbeat_ok "$LAB_WORK/dst-dies-held.hb" || fail "dst-dies-held: two copies ran"
kill -9 "$WORKLOAD_PID"

# The destination's CRIU dies holding the restored copy: the destination kills what it restored and says so; the
# source resumes its copy.
cell dst-criu-dies-held dst:notify:post-restore kill-criu --mode lazy
[ "$MIGRATE_STATUS" = 1 ] || fail "dst-criu-dies-held: phaul migrate exited $MIGRATE_STATUS, not 1"
wait_for 30 probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 20 || fail "dst-criu-dies-held: the workload does not run on A"
wait_for 20 nothing_on_b || fail "dst-criu-dies-held: processes left on B"
heartbeat_ok "$LAB_WORK/dst-criu-dies-held.hb" || fail "dst-criu-dies-held: two copies ran"
kill -9 "$WORKLOAD_PID"

# The source's phaul dies as it commits (journaled, not yet sent): its relay resets CRIU's page transfer, so CRIU
# resumes the tree, into phaul's freezer; the guard cannot ask the destination (handed-in descriptors) and leaves
# the copy frozen, in doubt. `phaul resolve` over a new connection to the destination's journal settles it.
cell src-dies-committing src:step:committing kill --mode lazy
wait_for 20 nothing_on_b || fail "src-dies-committing: processes left on B (the held copy must be discarded)"
kill -0 "$WORKLOAD_PID" 2>/dev/null || fail "src-dies-committing: the source's copy is gone"
# The guard writes "in doubt" once it has tried for --resolve-timeout (5 s here): wait for it, bounded.
in_doubt_session() {
  ls /var/lib/phaul/sessions/ | sed -n 's/\.source\.json$//p' | while read -r s; do
    [ "$(jq -r .state "/var/lib/phaul/sessions/$s.source.json")" = in-doubt ] && echo "$s"; done | tail -1
}
has_in_doubt() { [ -n "$(in_doubt_session)" ]; }
wait_for 30 has_in_doubt || true
session=$(in_doubt_session)
[ -n "$session" ] || fail "src-dies-committing: no in-doubt source journal: $(for f in /var/lib/phaul/sessions/*.source.json; do jq -c '{session,state,note,guard_pid}' "$f"; done)"
grep -q "frozen 1" /sys/fs/cgroup/phaul-"${session:0:16}"/cgroup.events ||
  fail "src-dies-committing: the source's copy is not held frozen"
_next_port; rp=$_lab_port
in_b lab-fd-accept 3 "$rp" -- phaul serve --fdrpc 3 > "$LAB_WORK/resolve-serve.out" 2>&1 &
in_a bash -c 'until exec 3<>/dev/tcp/$0/$1; do sleep 0.05; done 2>/dev/null; exec phaul resolve "$2" --side source --fdrpc 3' \
  "$HOSTB_ADDR" "$rp" "$session" > "$LAB_WORK/resolve.out" 2>&1 || fail "src-dies-committing: phaul resolve failed: $(cat "$LAB_WORK/resolve.out")"
log "resolve: $(cat "$LAB_WORK/resolve.out")"
grep -q "resumed" "$LAB_WORK/resolve.out" || fail "src-dies-committing: resolve did not resume the source's copy"
wait_for 30 probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 20 || fail "src-dies-committing: the resolved workload does not run"
heartbeat_ok "$LAB_WORK/src-dies-committing.hb" || fail "src-dies-committing: two copies ran"
kill -9 "$WORKLOAD_PID"

# The link cut after the destination's copy started, while most pages are still to come: post-copy's stated risk.
# The workload is reported lost (or, where a side cannot tell, in doubt) on both sides, nothing of it is left on
# the destination, it never ran twice, and the source's CRIU did not take the broken transfer for success.
lost_cell() {
  _lc=$1
  [ "$MIGRATE_STATUS" = 4 ] || [ "$MIGRATE_STATUS" = 3 ] ||
    fail "$_lc: phaul migrate exited $MIGRATE_STATUS, not 4 (lost) or 3 (in doubt)"
  jq -e '.outcome == "lost" or .outcome == "in-doubt"' "$LAB_WORK/$_lc/report.json" > /dev/null ||
    fail "$_lc: the report says $(jq -r .outcome "$LAB_WORK/$_lc/report.json"), not lost"
  wait_for 40 nothing_on_b || fail "$_lc: processes left on B: $(ip netns pids "$HOSTB")"
  heartbeat_ok "$LAB_WORK/$_lc.hb" || fail "$_lc: two copies ran"
  kill -9 "$WORKLOAD_PID" 2>/dev/null || true
}
throttle 8mibps
cell lazy-cut-after-commit dst:send:Committed "cut-after 0.3" --mode lazy
lost_cell lazy-cut-after-commit
# (dirtying faster than the channel carries, so that post-copy has most of the memory left to move)
CELL_DIRTY=40 cell hybrid-cut-after-commit dst:send:Committed "cut-after 0.3" --pre-dump on --post-copy-after 1
lost_cell hybrid-cut-after-commit
unthrottle
log "every cell held the invariant"
