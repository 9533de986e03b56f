# policy-phaul: --policy phaul (P.Haul's rules) stops pre-copy for:
#  - an idle workload: the second round writes at most 64 pages ("few enough pages");
#  - a workload that rewrites all its memory every round: neither few nor growing, so 8 rounds ("round limit");
#  - a workload that starts growing once the first pre-dump has cleared its soft-dirty bits, at 32 MiB/s over a
#    channel throttled to 8 MiB/s: while the first round's 8 MiB travel (1 s), more than 8.8 MiB of new memory
#    appear (up to 16 MiB), so the second round writes more than 110 % of the first ("grew").
# Each migration must still deliver the workload intact.
. "$LAB/scenarios/lib.sh"

check_reason() { # NAME EXPECTED-SUBSTRING
  reason=$(jq -r .memory.stop_reason "$MIGRATE_REPORT")
  rounds=$(jq -r '[.rounds[] | select(.kind == "pre-dump")] | length' "$MIGRATE_REPORT")
  log "$1: $rounds pre-dump rounds, stopped because $reason ($(jq -c '[.rounds[].pages_written]' "$MIGRATE_REPORT"))"
  case "$reason" in *"$2"*) ;; *) fail "$1: expected a stop because of '$2', got '$reason'" ;; esac
  expect_json "$MIGRATE_REPORT" '.outcome == "migrated"'
  wait_for 20 pid_gone "$WORKLOAD_PID" || fail "$1: the source pid $WORKLOAD_PID still exists"
  probe "$RESTORED_PID" "$WORKLOAD_STATE" 180 || fail "$1: the restored workload is not ok"
}

start_workload memory idle --size-mib 64
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "idle workload not ok"
migrate small "$WORKLOAD_PID" --pre-dump on --policy phaul --timeout 120 || fail "small: phaul migrate exited $MIGRATE_STATUS"
check_reason small "few enough pages"
expect_json "$MIGRATE_REPORT" '.rounds[1].pages_written <= 64'

start_workload memory busy --size-mib 32 --dirty-mib-s 4000
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "busy workload not ok"
migrate limit "$WORKLOAD_PID" --pre-dump on --policy phaul --timeout 120 || fail "limit: phaul migrate exited $MIGRATE_STATUS"
check_reason limit "round limit"
expect_json "$MIGRATE_REPORT" '[.rounds[] | select(.kind == "pre-dump")] | length == 8'

throttle 8mibps
start_workload memory grow --size-mib 8 --grow-after-checkpoint 32 --grow-max-mib 24
probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || fail "growing workload not ok"
expect_json "$WORKLOAD_STATE/state.json" '.growing == false' "the workload grew before any checkpoint"
migrate grow "$WORKLOAD_PID" --pre-dump on --policy phaul --timeout 120 || fail "grow: phaul migrate exited $MIGRATE_STATUS"
check_reason grow "grew"
expect_json "$MIGRATE_REPORT" '[.rounds[] | select(.kind == "pre-dump")] | length == 2' "not exactly 2 pre-copy rounds"
expect_json "$MIGRATE_REPORT" '.rounds[1].pages_written * 10 > .rounds[0].pages_written * 11'
expect_json "$WORKLOAD_STATE/state.json" '.growing == true' "the restored workload does not say it grew"
unthrottle
