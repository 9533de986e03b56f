# policy-phaul: --policy phaul (P.Haul's rules) stops pre-copy for:
#  - an idle workload: the second round writes at most 64 pages ("few enough pages");
#  - a workload that rewrites all its memory every round: neither few nor growing, so 8 rounds ("round limit").
# The third rule (pages written grow by more than 10 % between rounds) needs memory growing faster than the channel
# carries it; this emulated guest cannot grow memory that fast, and a workload growing after each freeze proved
# timing-dependent (a pre-dump's freeze is too short to notice reliably). It is unit-tested (phaul-core
# engine::policy); a throttled channel (tc in the guest) would make a lab test deterministic.
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
