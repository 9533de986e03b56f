# post-copy: --mode lazy moves a 128 MiB workload: phaul first checks on both hosts that lazy pages work (a trial
# on a throwaway process), the workload then runs on host B at once and pulls its memory on demand; it must end up
# with all its memory intact (checksum) and the report must say when the last page arrived.
. "$LAB/scenarios/lib.sh"

start_workload memory mem --size-mib 128
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "the workload is not ok before the migration"

migrate m1 "$WORKLOAD_PID" --mode lazy --timeout 60 || fail "phaul migrate exited $MIGRATE_STATUS (phaul serve: $SERVE_STATUS)"
[ "$SERVE_STATUS" = 0 ] || fail "phaul serve exited $SERVE_STATUS"
expect_json "$MIGRATE_REPORT" '.outcome == "migrated"'
expect_json "$MIGRATE_REPORT" '.memory.strategy == "post-copy"'
expect_json "$MIGRATE_REPORT" '.downtime_ms > 0' "no downtime measured"
expect_json "$MIGRATE_REPORT" '.post_copy_ms > 0' "the report does not say when the last page arrived"
# The final dump left the pages on the source: they were pulled lazily, not written during the freeze.
lazy=$(jq -r '.rounds[-1].pages_written' "$MIGRATE_REPORT")
log "final dump wrote $lazy pages while frozen; downtime $(jq -r .downtime_ms "$MIGRATE_REPORT") ms, last page after $(jq -r .post_copy_ms "$MIGRATE_REPORT") ms"
[ "$lazy" -lt 16384 ] || fail "the frozen dump wrote $lazy pages: the memory was not left for post-copy"
[ -n "$RESTORED_PID" ] || fail "no restored pid in --dst-rpid"
wait_for 20 pid_gone "$WORKLOAD_PID" || fail "the source pid $WORKLOAD_PID still exists"
[ "$(netns_of "$RESTORED_PID")" = "$(in_b readlink /proc/self/ns/net)" ] ||
  fail "restored pid $RESTORED_PID is not in host B's network namespace"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 180 || fail "the restored workload's memory is not intact"
