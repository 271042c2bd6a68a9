"""Where a kernel's warps wait, from an Nsight Compute source-page export (no GPU needed).

Input: `ncu -i REPORT.ncu-rep --page source --csv --print-source sass > sass.csv` of a report collected
with `--section WarpStateStats --section SourceCounters` (gpu_run.sh stage `profile_source` writes both).
Output: the warp-stall samples per reason (share of all samples), then the instructions with the most
samples (offset from the kernel's first instruction, share, main reason, SASS), then the samples per
opcode family. A sample is one warp found not issuing (or issuing: `selected`) at that instruction.

python scripts/stall_summary.py sass.csv [--top 25]
"""

import argparse
import collections
import csv
import sys

TOTAL = "Warp Stall Sampling (All Samples)"


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_rows(path):
    """(kernel name, header, rows) of one export; the first line names the kernel."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    kernel = lines[0][1] if lines and lines[0] and lines[0][0] == "Kernel Name" else "?"
    start = 1 if kernel != "?" else 0
    header, rows = lines[start], [r for r in lines[start + 1 :] if len(r) == len(lines[start])]
    if TOTAL not in header or "Address" not in header or "Source" not in header:
        raise SystemExit(
            f"{path}: not a source-page export with warp-stall samples (columns {header[:6]} ...)"
        )
    return kernel, header, rows


def summarize(path, top=25):
    """The report as text (see the module docstring)."""
    kernel, header, rows = read_rows(path)
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples = [number(r[col[TOTAL]]) for r in rows]
    total = sum(samples)
    if total == 0:
        raise SystemExit(f"{path}: no warp-stall samples")
    base = int(rows[0][col["Address"]], 16)
    out = [
        f"kernel: {kernel}",
        f"warp-stall samples: {total:.0f}",
        "",
        "| reason | samples | share |",
        "|---|---:|---:|",
    ]
    per_reason = collections.Counter({h: sum(number(r[col[h]]) for r in rows) for h in reasons})
    for name, value in per_reason.most_common():
        if value:
            out.append(f"| {name[len('stall_') :]} | {value:.0f} | {100 * value / total:.1f}% |")
    out += ["", "| offset | share | main reason | instruction |", "|---:|---:|---|---|"]
    for n, r in sorted(zip(samples, rows), key=lambda pair: -pair[0])[:top]:
        share = n / total
        main = max(reasons, key=lambda h: number(r[col[h]]))[len("stall_") :]
        offset = int(r[col["Address"]], 16) - base
        out.append(f"| 0x{offset:x} | {100 * share:.1f}% | {main} | `{' '.join(r[col['Source']].split())}` |")
    families = collections.Counter()
    for n, r in zip(samples, rows):
        words = [w for w in r[col["Source"]].split() if not w.startswith("@")]  # without the predicate
        families[(words[0] if words else "?").split(".")[0]] += n
    out += ["", "| opcode | share |", "|---|---:|"]
    out += [f"| {op} | {100 * v / total:.1f}% |" for op, v in families.most_common(12) if v]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    print(summarize(args.csv, args.top))


if __name__ == "__main__":
    sys.exit(main())
