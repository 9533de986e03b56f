# lab: optional (not run by default: it reproduces a known phaul bug; run it with --scenarios listen-relay)
#
# listen-relay: `phaul serve --listen` / `phaul migrate --to` through TCP forwarders, the way phaul's own error
# message suggests connecting real machines (an SSH tunnel to a loopback port): socat relays A 127.0.0.1 -> veth ->
# B 127.0.0.1. Five small migrations; PASS only if all five succeed.
#
# Known to fail as of commit 03c50d1: the source opens its control, memory and filesystem connections back to back
# before the greeting, and `phaul serve` takes the first accepted connection as control, the second as memory, the
# third as filesystem. A forwarder opens each onward connection independently, so they can arrive in any order
# ("the peer did not start with a Hello" or "a memory connection arrived for session X, but session X is being
# served"). In two lab runs 12 of 13 such migrations failed.
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
