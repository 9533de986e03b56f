# bench-modes (a benchmark, not a test; run by bench/modes/run): downtime per memory mode -- stop-and-copy,
# stop-and-copy with --lazy-restore, pre-copy, post-copy, hybrid -- against workload size (16, 128, 512 MiB) and dirty rate (idle, light), all in one
# lab run. Each migration's JSON report goes back to the host as REPORT <mode>-<size>-<dirty>; nothing is
# asserted beyond the migration succeeding and the workload arriving intact.
# lab: optional
. "$LAB/scenarios/lib.sh"

sizes=${BENCH_SIZES:-16 128 512}
dirties=${BENCH_DIRTY:-0 8}
failed=0
for size in $sizes; do
  for dirty in $dirties; do
    for mode in stop-and-copy lazy-restore pre-copy post-copy hybrid; do
      case $mode in
        stop-and-copy) args=(--pre-dump off) ;;
        lazy-restore) args=(--pre-dump off --lazy-restore) ;;
        pre-copy) args=(--pre-dump on) ;;
        post-copy) args=(--mode lazy) ;;
        hybrid) args=(--pre-dump on --post-copy-after 1) ;;
      esac
      name=$mode-$size-$dirty
      start_workload memory "$name" --size-mib "$size" --dirty-mib-s "$dirty"
      probe "$WORKLOAD_PID" "$WORKLOAD_STATE" 180 || { log "$name: workload not ok"; failed=1; continue; }
      if migrate "$name" "$WORKLOAD_PID" "${args[@]}" --timeout 300 &&
        probe "$RESTORED_PID" "$WORKLOAD_STATE" 180; then
        log "$name: downtime $(jq -r .downtime_ms "$MIGRATE_REPORT") ms, total $(jq -r .total_ms "$MIGRATE_REPORT") ms"
        kill -9 "$RESTORED_PID" 2>/dev/null
      else
        log "$name: FAILED"
        failed=1
        kill -9 "$WORKLOAD_PID" "$RESTORED_PID" 2>/dev/null
      fi
    done
  done
done
[ "$failed" = 0 ] || fail "some migrations failed (see above)"
