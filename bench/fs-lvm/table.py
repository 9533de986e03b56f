#!/usr/bin/env python3
"""Turns the bench-fs-lvm lab reports (figures-N.json) into bench/results/fs-lvm/results.md, results.json and
bars.json (the bar chart's input for phaul-bench --bar-chart): medians of the lvm driver's frozen round, the
whole freeze, round 1 and the full dd of the volume, and the issue's target (frozen round <= 0.05 of a full copy)."""
import json
import pathlib
import statistics
import sys

reports, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
reps = [json.loads(f.read_text()) for f in sorted(reports.glob("figures-*.json"))]


def med(key):
    v = [r[key] for r in reps if isinstance(r.get(key), (int, float))]
    return statistics.median(v) if v else None


def ms(x):
    return "-" if x is None else f"{x:.0f}"


final, full = med("final_round_ms"), med("dd_full_ms")
ratio = final / full if final is not None and full else None
files = reps[0]["files"] if reps else "-"
mib = reps[0]["tree_mib"] if reps else "-"
md = [
    "# The lvm driver's frozen round against a full copy of the volume (lab kernel)",
    "",
    f"Tree: {files} files, {mib} MiB in all on ext4 on an LVM thin volume, plus the tree-writer workload's own "
    f"files; {len(reps)} repetition(s), medians; qemu without KVM (TCG), so every figure is slow in absolute terms "
    "and only the ratio means much. Made by `bench/fs-lvm/run`.",
    "",
    "| method | what is measured | ms |",
    "|---|---|---|",
    f"| phaul-lvm | the frozen filesystem round (after {ms(med('live_rounds'))} live round(s)) | {ms(final)} |",
    f"| phaul-lvm | the whole freeze (CRIU dump, final round, restore, commit) | {ms(med('frozen_ms'))} |",
    f"| phaul-lvm | round 1 (every mapped block, the workload running) | {ms(med('first_round_ms'))} |",
    f"| phaul-lvm | the whole migration | {ms(med('total_ms'))} |",
    f"| lvm-full | `dd` of a thin snapshot of the volume into a volume of B's pool | {ms(full)} |",
    "",
    "**Target: the frozen round costs at most 5 % of a full copy.** Measured ratio (frozen round ÷ full copy): "
    + ("-" if ratio is None else f"{ratio:.3f}")
    + " — "
    + ("not measured" if ratio is None else ("met" if ratio <= 0.05 else "NOT met"))
    + ".",
    "",
    "![frozen round vs full copy](frozen-round.png)",
    "",
]
out.mkdir(parents=True, exist_ok=True)
(out / "results.md").write_text("\n".join(md))
(out / "results.json").write_text(json.dumps({"reps": reps, "ratio_final_to_full": ratio}, indent=2))
bars = [
    {"label": "phaul-lvm: frozen round", "value": final, "style": "phaul"},
    {"label": "phaul-lvm: whole freeze", "value": med("frozen_ms"), "style": "phaul"},
    {"label": "lvm: dd of the volume", "value": full, "style": "criu"},
]
(out / "bars.json").write_text(json.dumps({"title": "lvm: the frozen round against a full copy (ms, log scale)",
                                           "bars": [b for b in bars if b["value"] is not None]}, indent=2))
print("\n".join(md))
