# no-converge: a workload that rewrites all of its 32 MiB several times a second, over a channel throttled to
# 16 MiB/s. Every round then has 32 MiB to move (2 s, far over the 300 ms --max-downtime) on any machine, however
# fast or slow qemu emulates the CPU. With the default policy, phaul must detect that pre-copy cannot converge
# within the round bound and do what --on-no-converge says: stop-and-copy (the workload arrives intact), or abort
# (nothing frozen for good: the workload keeps running on host A).
. "$LAB/scenarios/lib.sh"

throttle 16mibps
start_workload memory fast --size-mib 32 --dirty-mib-s 4000
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "the workload is not ok before the migration"

migrate abort "$WORKLOAD_PID" --pre-dump on --on-no-converge abort --timeout 120
[ "$MIGRATE_STATUS" != 0 ] || fail "the migration succeeded although pre-copy cannot converge and abort was asked"
grep -q "pre-copy did not converge" "$LAB_WORK/abort/migrate.err" || fail "the error does not say pre-copy did not converge"
expect_json "$MIGRATE_REPORT" '.outcome == "failed"'
rounds=$(jq -r '.rounds | length' "$MIGRATE_REPORT")
log "abort: gave up after $rounds pre-dump rounds: $(jq -r .memory.stop_reason "$MIGRATE_REPORT")"
[ "$rounds" -le 16 ] || fail "$rounds rounds: non-convergence was not detected within the bound"
kill -0 "$WORKLOAD_PID" || fail "the workload died on host A"
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "the workload on host A is not ok after the abort"

migrate fallback "$WORKLOAD_PID" --pre-dump on --timeout 120 ||
  fail "phaul migrate exited $MIGRATE_STATUS (phaul serve: $SERVE_STATUS)"
expect_json "$MIGRATE_REPORT" '.outcome == "migrated"'
expect_json "$MIGRATE_REPORT" '.memory.fallback == "stop-and-copy"' "the stop-and-copy fallback did not run"
expect_json "$MIGRATE_REPORT" '.rounds[-1].kind == "dump"'
reason=$(jq -r .memory.stop_reason "$MIGRATE_REPORT")
rounds=$(jq -r '.rounds | length' "$MIGRATE_REPORT")
log "fallback: $rounds rounds, stopped because $reason"
case "$reason" in
  *"as fast as the channel"*|*"stopped shrinking"*|*"round limit"*) ;;
  *) fail "the stop reason is not a non-convergence: $reason" ;;
esac
[ "$rounds" -le 17 ] || fail "$rounds rounds: non-convergence was not detected within the bound"
wait_for 20 pid_gone "$WORKLOAD_PID" || fail "the source pid $WORKLOAD_PID still exists"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 180 || fail "the restored workload is not ok"
