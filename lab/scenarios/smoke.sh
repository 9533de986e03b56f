# smoke: the guest works: CRIU 3.17 passes `criu check`, and `phaul check` finds pre-copy available (the lab
# kernel tracks dirty memory).
. "$LAB/scenarios/lib.sh"

v=$(criu --version 2>&1) || fail "criu --version failed: $v"
log "$(echo "$v" | tr '\n' ' ')"
echo "$v" | grep -q 'Version: 3\.17' || fail "expected CRIU 3.17 in the guest, got: $v"

criu check > "$LAB_WORK/criu-check.txt" 2>&1
rc=$?
cat "$LAB_WORK/criu-check.txt"
[ "$rc" = 0 ] || fail "criu check exited $rc: $(tail -n 3 "$LAB_WORK/criu-check.txt" | tr '\n' ' ')"
criu check --feature mem_dirty_track > "$LAB_WORK/criu-mem.txt" 2>&1 ||
  fail "criu check --feature mem_dirty_track: $(cat "$LAB_WORK/criu-mem.txt")"
log "criu: $(cat "$LAB_WORK/criu-mem.txt")"

phaul check > "$LAB_WORK/phaul-check.txt" 2>&1
rc=$?
cat "$LAB_WORK/phaul-check.txt"
[ "$rc" = 0 ] || fail "phaul check exited $rc: $(tr '\n' ' ' < "$LAB_WORK/phaul-check.txt")"
grep -q 'pre-copy: *available' "$LAB_WORK/phaul-check.txt" ||
  fail "phaul check does not report pre-copy available: $(grep '^pre-copy' "$LAB_WORK/phaul-check.txt")"
phaul check --json > "$LAB_WORK/check.json" 2>/dev/null && report check "$LAB_WORK/check.json"
log "pre-copy available"
