# hybrid: pre-copy rounds first, then post-copy for what is left. Two ways in: --post-copy-after N rounds, and
# --on-no-converge post-copy when the workload dirties memory faster than the channel (throttled to 16 MiB/s, so
# that this holds on any machine). Both must end with the workload on host B, its memory intact.
. "$LAB/scenarios/lib.sh"

start_workload memory warm --size-mib 128 --dirty-mib-s 20
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "the workload is not ok before the migration"
migrate after2 "$WORKLOAD_PID" --pre-dump on --post-copy-after 2 --timeout 120 ||
  fail "phaul migrate exited $MIGRATE_STATUS (phaul serve: $SERVE_STATUS)"
expect_json "$MIGRATE_REPORT" '.outcome == "migrated"'
expect_json "$MIGRATE_REPORT" '.memory.strategy == "hybrid"'
expect_json "$MIGRATE_REPORT" '[.rounds[] | select(.kind == "pre-dump")] | length == 2' "not exactly 2 pre-copy rounds"
expect_json "$MIGRATE_REPORT" '.post_copy_ms > 0' "no post-copy phase"
# What the pre-copy rounds moved is restored from the destination's own copy; only what was dirtied after them
# travels as post-copy. How much that is depends on how long the last round took (20 MiB/s are dirtied meanwhile,
# and a loaded machine makes the rounds slow), so the check is loose: had post-copy moved again what pre-copy
# moved, almost none of the 32768 pages would be restored at once; at least half must be.
expect_json "$MIGRATE_REPORT" '.restore_stats.pages_restored >= 16384' \
  "the restore loaded few pages at once ($(jq -r .restore_stats.pages_restored "$MIGRATE_REPORT") of 32768): post-copy moved memory that pre-copy had already moved"
log "after2: downtime $(jq -r .downtime_ms "$MIGRATE_REPORT") ms, last page $(jq -r .post_copy_ms "$MIGRATE_REPORT") ms after the restore"
wait_for 20 pid_gone "$WORKLOAD_PID" || fail "the source pid $WORKLOAD_PID still exists"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 180 || fail "the restored workload's memory is not intact"

throttle 16mibps
start_workload memory fast --size-mib 32 --dirty-mib-s 4000
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "the second workload is not ok before the migration"
migrate fallback "$WORKLOAD_PID" --pre-dump on --on-no-converge post-copy --timeout 120 ||
  fail "phaul migrate exited $MIGRATE_STATUS (phaul serve: $SERVE_STATUS)"
expect_json "$MIGRATE_REPORT" '.outcome == "migrated"'
expect_json "$MIGRATE_REPORT" '.memory.fallback == "post-copy"' "the post-copy fallback did not run"
expect_json "$MIGRATE_REPORT" '.memory.strategy == "hybrid"'
wait_for 20 pid_gone "$WORKLOAD_PID" || fail "the source pid $WORKLOAD_PID still exists"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 180 || fail "the restored workload's memory is not intact"
