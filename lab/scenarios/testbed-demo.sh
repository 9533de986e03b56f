# testbed-demo: phaul's own demo binary (phaul-testbed's Lab: its own pair of network namespaces, three TCP
# connections across a veth handed to phaul as fds) with a 64 MiB workload, pre-copy chosen automatically; PASS
# if it prints "demo: OK" and the report shows pre-copy.
. "$LAB/scenarios/lib.sh"
PHAUL_DEMO_MIB=64 PHAUL_BIN_DIR=/usr/local/bin phaul-demo > "$LAB_WORK/demo.out" 2>&1
rc=$?
cat "$LAB_WORK/demo.out"
[ "$rc" = 0 ] || fail "phaul-demo exited $rc: $(grep -m1 'FAILED' "$LAB_WORK/demo.out")"
grep -q '^demo: OK' "$LAB_WORK/demo.out" || fail "phaul-demo did not print 'demo: OK'"
grep -q 'memory: *pre-copy' "$LAB_WORK/demo.out" || fail "phaul-demo did not use pre-copy on the lab kernel"
