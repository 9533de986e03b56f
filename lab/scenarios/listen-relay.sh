# listen-relay: `phaul serve --listen` / `phaul migrate --to` through TCP forwarders, the way phaul's own error
# message suggests connecting real machines (an SSH tunnel to a loopback port): socat relays A 127.0.0.1 -> veth ->
# B 127.0.0.1. Five small migrations; PASS only if all five succeed.
#
# A forwarder opens each onward connection independently, so phaul's three connections can reach `phaul serve` in
# any order; serve sorts them by their first frame (Hello or ChannelOpen). Before that fix (3882998) 12 of 13 such
# migrations failed.
. "$LAB/scenarios/lib.sh"
export LAB_TRANSPORT=relay
ok=0 failed=0 errors=""
for i in 1 2 3 4 5; do
  start_workload counter c$i
  if migrate m$i "$WORKLOAD_PID" --pre-dump off > "$LAB_WORK/m$i.out" 2>&1; then
    ok=$((ok + 1))
  else
    failed=$((failed + 1))
    e=$(grep -h 'error' "$LAB_WORK/m$i/serve.err" "$LAB_WORK/m$i/migrate.err" 2>/dev/null | head -1)
    log "migration $i failed: $e"
    errors="$errors${errors:+; }$i: $e"
  fi
done
log "through relays: $ok migrated, $failed failed"
[ "$failed" = 0 ] || fail "$failed of 5 migrations through relays failed ($errors)"
