"""Two builds on the same rows, from the ab_build stage of scripts/gpu_run.sh: per row, every round's
time of this tree and of the base copy, and base / tree of the medians (> 1: this tree is faster).

python scripts/ab_build_compare.py OUT_DIR [--field us|step_us] [--json combined.json] > table.md

OUT_DIR holds ab_build_tree_<round>/results.json and ab_build_base_<round>/results.json
(benchmarks/bench_decode.py's output). --field picks the time compared: `us` (the attention call
alone, the default) or `step_us` (the whole decode step, get_mla_metadata included).
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def load_times(path, field="us"):
    """bench_decode.py results.json -> {row label: time in field} for the rows that were timed."""
    rows = json.loads(Path(path).read_text())["rows"]
    return {r["label"]: r[field] for r in rows if r.get(field) is not None}


def rounds_of(out_dir, which, field="us"):
    """The rounds of one side, in round order."""
    dirs = [
        p
        for p in Path(out_dir).glob(f"ab_build_{which}_*")
        if p.is_dir() and p.name.rsplit("_", 1)[1].isdigit()
    ]
    dirs.sort(key=lambda p: int(p.name.rsplit("_", 1)[1]))
    return [load_times(d / "results.json", field) for d in dirs if (d / "results.json").is_file()]


def compare(tree, base):
    """[(label, tree times, base times, base median / tree median)] over the rows both sides timed in
    every round, in the first round's order."""
    labels = [k for k in tree[0] if all(k in r for r in tree + base)]
    out = []
    for k in labels:
        t = [r[k] for r in tree]
        b = [r[k] for r in base]
        out.append((k, t, b, statistics.median(b) / statistics.median(t)))
    return out


def markdown(rows):
    n = len(rows[0][1]) if rows else 0
    lines = [
        "| row | "
        + " | ".join(f"tree r{i + 1}" for i in range(n))
        + " | "
        + " | ".join(f"base r{i + 1}" for i in range(n))
        + " | base / tree |",
        "|---|" + "---:|" * (2 * n + 1),
    ]
    for label, t, b, ratio in rows:
        lines.append(f"| {label} | " + " | ".join(f"{x:.1f}" for x in t + b) + f" | {ratio:.3f}x |")
    ratios = [r[3] for r in rows]
    if ratios:
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        lines.append("")
        lines.append(
            f"{len(ratios)} rows: geometric mean {geo:.3f}x, min {min(ratios):.3f}x, max {max(ratios):.3f}x"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--field", default="us", choices=["us", "step_us"])
    ap.add_argument("--json", default=None, help="also write every round's times and the ratios here")
    args = ap.parse_args()
    tree, base = rounds_of(args.out_dir, "tree", args.field), rounds_of(args.out_dir, "base", args.field)
    if not tree or not base:
        sys.exit(f"{args.out_dir}: no ab_build_tree_* / ab_build_base_* results")
    rows = compare(tree, base)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [{"row": k, "tree_us": t, "base_us": b, "base_over_tree": r} for k, t, b, r in rows], indent=1
            )
        )


if __name__ == "__main__":
    main()
