# stop-and-copy: a 64 MiB memory workload moves from host A to host B with --pre-dump off and keeps running there
# intact (memory checksum, counter, network namespace), and the source is gone. Then a second one with
# --lazy-restore: the restore copies almost none of its pages (CRIU's lazy-pages daemon on B loads them from B's
# images after the workload resumed), and the workload is intact once every page is in.
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

start_workload memory lazy --size-mib 64 --dirty-mib-s 8
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 120 || fail "the second workload is not ok before the migration"
migrate m2 "$WORKLOAD_PID" --pre-dump off --lazy-restore --timeout 120 ||
  fail "--lazy-restore: phaul migrate exited $MIGRATE_STATUS (phaul serve: $SERVE_STATUS)"
expect_json "$MIGRATE_REPORT" '.outcome == "migrated" and .lazy_restore == true'
expect_json "$MIGRATE_REPORT" '.rounds[-1].pages_written >= 16384' "the dump did not move the 64 MiB"
expect_json "$MIGRATE_REPORT" '.restore_stats.pages_restored < 1024' \
  "the restore copied most pages itself: they were not left to the lazy-pages daemon"
expect_json "$MIGRATE_REPORT" '.pages_loaded_ms > 0' "the report does not say when the last page was loaded"
log "lazy restore: restore $(jq -r .restore_ms "$MIGRATE_REPORT") ms, every page loaded $(jq -r .pages_loaded_ms "$MIGRATE_REPORT") ms after it"
wait_for 20 pid_gone "$WORKLOAD_PID" || fail "the source pid $WORKLOAD_PID still exists"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 120 || fail "the workload restored with --lazy-restore is not ok"
