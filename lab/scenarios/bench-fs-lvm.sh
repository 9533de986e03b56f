# bench-fs-lvm (a benchmark, not a test; run by bench/fs-lvm/run): the lvm driver's frozen round against a full
# `dd` of the volume, side by side in one lab run. A tree of 1 GiB as on the host benchmarks, in 1 000 files (not
# 10 000: a file costs a process here, slow under TCG, and the count matters little to a block copy), on an ext4
# thin volume sized to it (1.3 GiB), the tree-writer workload changing it. One repetition (a second tree of that
# size did not fit the guest's memory after the first: its workload never started): `dd` of a thin snapshot of
# the volume into a volume of B's pool, then a phaul migration with --fs lvm (stop-and-copy). The figures go back
# as REPORT figures-N; nothing is asserted beyond the migration succeeding. Needs the guest memory
# bench/fs-lvm/run gives it (the loop devices' files live in the guest's memory).
# lab: optional
. "$LAB/scenarios/lib.sh"
. "$LAB/scenarios/lvm-lib.sh"

files=1000
tree_mib=1024
reps=1
vol_mib=$((tree_mib * 5 / 4 + 64))
make_vgs $((vol_mib * 3 + 256))
run lvcreate -q -L $((vol_mib * 3 / 2))M -T vga/pool
run lvcreate -q -L $((vol_mib * 3 / 2))M -T vgb/pool
SERVE_OPTS=(--fs-opt lvm:vg=vgb --fs-opt lvm:pool=pool --fs-opt lvm:allow=/mnt)

ms_now() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }

for rep in $(seq 1 "$reps"); do
  new_volume "ct$rep" "$vol_mib" /mnt/ct$rep
  mkdir -p /mnt/ct$rep/bulk
  for i in $(seq 1 "$files"); do
    dd if=/dev/urandom of="/mnt/ct$rep/bulk/f$i" bs=64K count=$((tree_mib * 16 / files)) status=none ||
      fail "rep $rep: writing the tree"
  done
  sync
  start_workload tree-writer "w$rep" --dir "/mnt/ct$rep"
  wait_for 60 test -e /mnt/ct$rep/data/n12 || fail "rep $rep: the tree-writer does not write"

  # The bare full copy: dd of a thin snapshot of the volume (all of it, as a copy that knows nothing of the
  # filesystem moves it) into a fresh volume of B's pool.
  run lvcreate -q -s -n full-src "vga/ct$rep"
  run lvchange -q -ay -K vga/full-src
  run lvcreate -q -V "${vol_mib}M" -T vgb/pool -n full
  t0=$(ms_now)
  run dd if=/dev/vga/full-src of=/dev/vgb/full bs=4M conv=fsync status=none
  full_ms=$(( $(ms_now) - t0 ))
  run lvremove -q -y vga/full-src vgb/full

  migrate "rep-$rep" "$WORKLOAD_PID" --fs lvm --htype-opt root=/mnt/ct$rep --pre-dump off --timeout 900 ||
    fail "rep $rep: phaul migrate exited $MIGRATE_STATUS (serve $SERVE_STATUS)"
  nfiles=$(find "/mnt/ct$rep/bulk" -type f | wc -l)
  jq --argjson full "$full_ms" --argjson files "$nfiles" --argjson rep "$rep" --argjson mib "$tree_mib" \
    '{rep: $rep, files: $files, tree_mib: $mib, dd_full_ms: $full,
      final_round_ms: .fs_round_list[-1].duration_ms, final_round_bytes: .fs_round_list[-1].bytes,
      first_round_ms: .fs_round_list[0].duration_ms, live_rounds: ((.fs_round_list | length) - 1),
      frozen_ms: .frozen_ms, total_ms: .total_ms}' "$MIGRATE_REPORT" > "$LAB_WORK/rep-$rep.json" ||
    fail "rep $rep: no figures in the report"
  report "figures-$rep" "$LAB_WORK/rep-$rep.json"
  log "rep $rep: frozen round $(jq -r .final_round_ms "$LAB_WORK/rep-$rep.json") ms, dd of the volume $full_ms ms"

  # Clean for the next repetition: the restored workload, both volumes.
  kill -9 "$RESTORED_PID" 2>/dev/null
  wait_for 10 pid_gone "$RESTORED_PID"
  _in_b_ns umount /mnt/ct$rep 2>/dev/null
  umount /mnt/ct$rep 2>/dev/null
  lvremove -q -y vga/ct$rep vgb/ct$rep > /dev/null 2>&1
done
