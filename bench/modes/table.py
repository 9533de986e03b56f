#!/usr/bin/env python3
"""Turns the bench-modes lab reports into bench/results/modes.md (and .json): downtime per mode, size, dirty rate,
and the issue's two targets."""
import json
import pathlib
import sys

reports, md_out, json_out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
rows = {}
for f in sorted(reports.glob("*.json")):
    mode_size_dirty = f.stem.rsplit("-", 2)
    if len(mode_size_dirty) != 3:
        continue
    mode, size, dirty = mode_size_dirty[0], int(mode_size_dirty[1]), int(mode_size_dirty[2])
    r = json.loads(f.read_text())
    if r.get("outcome") != "migrated":
        continue
    rows[(mode, size, dirty)] = {
        "downtime_ms": r.get("downtime_ms"),
        "total_ms": r.get("total_ms"),
        "rounds": len(r.get("rounds", [])),
        "final_pages": (r.get("rounds") or [{}])[-1].get("pages_written"),
        "post_copy_ms": r.get("post_copy_ms"),
        "pages_loaded_ms": r.get("pages_loaded_ms"),
        "restore_ms": r.get("restore_ms"),
        "predicted_ms": r.get("predicted_downtime_ms"),
    }

modes = ["stop-and-copy", "lazy-restore", "pre-copy", "post-copy", "hybrid"]
sizes = sorted({k[1] for k in rows})
dirties = sorted({k[2] for k in rows})
fmt = lambda v: "-" if v is None else f"{v:.0f}"
lines = ["# Downtime per memory mode (lab kernel under qemu TCG, one run)", "",
         "Downtime: stop-and-copy and pre-copy, CRIU's frozen time (freeze until the destination confirmed the",
         "restore); post-copy and hybrid, phaul's measure from the freeze until the destination's restore finished.",
         "lazy-restore is stop-and-copy with --lazy-restore (the destination loads pages on demand from its own copy).",
         "The restore on the destination is inside the frozen time: in pre-copy it still copies every pre-copied page",
         "(CRIU's lazy-pages daemon cannot load pages from a parent image), which bounds pre-copy's downtime here.",
         "The guest is emulated (no KVM): absolute times are several times those of real hardware; compare ratios.", ""]
for d in dirties:
    lines += [f"## Dirty rate {d} MiB/s", "", "| size (MiB) | " + " | ".join(f"{m} downtime ms" for m in modes) +
              " | pre-copy rounds | pre-copy restore ms | post-copy last page ms | lazy-restore last page ms |",
              "|" + "---|" * (len(modes) + 5)]
    for s in sizes:
        cells = [fmt(rows.get((m, s, d), {}).get("downtime_ms")) for m in modes]
        pre = rows.get(("pre-copy", s, d), {})
        post = rows.get(("post-copy", s, d), {})
        lazy = rows.get(("lazy-restore", s, d), {})
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {pre.get('rounds', '-')} | {fmt(pre.get('restore_ms'))}"
                     f" | {fmt(post.get('post_copy_ms'))} | {fmt(lazy.get('pages_loaded_ms'))} |")
    lines.append("")

def ratio(a, b):
    return None if not a or not b else a / b

light = max(dirties) if dirties else 0
big = max(sizes) if sizes else 0
small = min(sizes) if sizes else 0
t1 = ratio(rows.get(("pre-copy", big, light), {}).get("downtime_ms"), rows.get(("stop-and-copy", big, light), {}).get("downtime_ms"))
t2 = ratio(rows.get(("post-copy", big, 0), {}).get("downtime_ms"), rows.get(("post-copy", small, 0), {}).get("downtime_ms"))
verdict = lambda v, limit: "-" if v is None else f"{v:.2f} ({'PASS' if v <= limit else 'MISS'})"
lines += ["## Targets", "", "| target | measured |", "|---|---|",
          f"| pre-copy downtime at {big} MiB, {light} MiB/s dirtying <= 0.1 x stop-and-copy's | {verdict(t1, 0.1)} |",
          f"| post-copy downtime at {big} MiB <= 1.3 x at {small} MiB | {verdict(t2, 1.3)} |", ""]
md_out.write_text("\n".join(lines))
json_out.write_text(json.dumps({"rows": {f"{m}-{s}-{d}": v for (m, s, d), v in rows.items()},
                                "targets": {"precopy_vs_stop_and_copy": t1, "postcopy_big_vs_small": t2}}, indent=1))
print("\n".join(lines))
