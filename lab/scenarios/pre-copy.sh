# pre-copy: a mostly idle 256 MiB memory workload moves with --pre-dump on. The first pre-dump round copies the
# memory while the workload runs; the final (frozen) dump must write far fewer pages (under 10% of the first
# round); then the workload runs intact on host B.
. "$LAB/scenarios/lib.sh"

start_workload memory mem --size-mib 256
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "the workload is not ok before the migration"

migrate m1 "$WORKLOAD_PID" --pre-dump on || fail "phaul migrate exited $MIGRATE_STATUS (phaul serve: $SERVE_STATUS)"
[ "$SERVE_STATUS" = 0 ] || fail "phaul serve exited $SERVE_STATUS"
expect_json "$MIGRATE_REPORT" '.outcome == "migrated"'
expect_json "$MIGRATE_REPORT" '.memory.strategy == "pre-copy"'
expect_json "$MIGRATE_REPORT" '.rounds[0].kind == "pre-dump"' "the first round is not a pre-dump"
expect_json "$MIGRATE_REPORT" '.rounds[-1].kind == "dump"' "the last round is not the final dump"
first=$(jq -r '.rounds[0].pages_written' "$MIGRATE_REPORT")
final=$(jq -r '.rounds[-1].pages_written' "$MIGRATE_REPORT")
rounds=$(jq -r '.rounds | length' "$MIGRATE_REPORT")
log "first pre-dump wrote $first pages, the final dump $final pages ($rounds rounds)"
[ "$first" -ge 58982 ] || fail "the first pre-dump wrote $first pages, less than 90% of 256 MiB (65536 pages)"
[ $((final * 10)) -lt "$first" ] || fail "the final dump wrote $final pages, not far fewer than the first pre-dump's $first"
[ -n "$RESTORED_PID" ] || fail "no restored pid in --dst-rpid"

wait_for 20 pid_gone "$WORKLOAD_PID" || fail "the source pid $WORKLOAD_PID still exists"
[ "$(netns_of "$RESTORED_PID")" = "$(in_b readlink /proc/self/ns/net)" ] ||
  fail "restored pid $RESTORED_PID is not in host B's network namespace"
probe "$RESTORED_PID" "$WORKLOAD_STATE" 180 || fail "the restored workload is not ok"
