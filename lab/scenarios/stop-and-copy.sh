# stop-and-copy: a 64 MiB memory workload moves from host A to host B with --pre-dump off and keeps running there
# intact (memory checksum, counter, network namespace), and the source is gone.
. "$LAB/scenarios/lib.sh"

start_workload memory mem --size-mib 64
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 120 || fail "the workload is not ok before the migration"
before=$(state_get "$WORKLOAD_STATE" .counter)

migrate m1 "$WORKLOAD_PID" --pre-dump off || fail "phaul migrate exited $MIGRATE_STATUS (phaul serve: $SERVE_STATUS)"
[ "$SERVE_STATUS" = 0 ] || fail "phaul serve exited $SERVE_STATUS"
expect_json "$MIGRATE_REPORT" '.outcome == "migrated"'
expect_json "$MIGRATE_REPORT" '.memory.strategy == "stop-and-copy"'
expect_json "$MIGRATE_REPORT" '[.rounds[] | select(.kind == "pre-dump")] | length == 0' "a pre-dump ran with --pre-dump off"
expect_json "$MIGRATE_REPORT" '.rounds[-1].kind == "dump" and .rounds[-1].pages_written >= 16384' \
  "the dump round did not write the 64 MiB (16384 pages)"
[ -n "$RESTORED_PID" ] || fail "no restored pid in --dst-rpid"

wait_for 20 pid_gone "$WORKLOAD_PID" || fail "the source pid $WORKLOAD_PID still exists"
[ "$(netns_of "$RESTORED_PID")" = "$(in_b readlink /proc/self/ns/net)" ] ||
  fail "restored pid $RESTORED_PID is not in host B's network namespace"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 120 || fail "the restored workload is not ok"
after=$(printf '%s' "$PROBE_STATE" | jq -r .counter)
[ "$after" -ge "$before" ] || fail "counter went back: $before before, $after after"
log "counter $before before, $after after; restored pid $RESTORED_PID in host B"
