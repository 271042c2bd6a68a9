#!/usr/bin/env python3
"""GPU decode benchmark: FlashMLA's grid (and a few extra rows), compared with the FlashMLA and Triton anchors.

Grid (DESIGN §6): b=128, d=576, dv=512, h_kv=1, causal, page 64, bf16;
s_k {4096, 8192} x h_q {16, 32, 64, 128} x s_q {1, 2} x {fixed, varlen}: 32 rows.
Extra rows: page sizes 16 and 128, and s_q 4 and 8 (no anchors for them). Page rows (--rows pages, not in
"all"): 1-, 2-, 16- and 48-token pages at 16, 64 and 128 query rows. Query-row rows (--rows qrows, not in
"all"): 16 to 256 query rows per KV head, each row's time against the 64-row row's (issue 4: no cliff past 64).

Each row: random inputs (benchmarks/common.py: random bf16, random page permutation, NaN past each
sequence's end; varlen lengths by FlashMLA's rule, reseeded per row), the decode step
(get_mla_metadata + flash_mla_with_kvcache) captured in a CUDA graph and replayed (median of --iters
per-replay CUDA-event times after warm-up), then a correctness spot check of the graph's outputs against
an fp32 PyTorch reference on a few batch entries (and the whole output finite). A row that fails the
check posts no number.

Usage:
  python benchmarks/bench_decode.py --out out/bench                  # the 32-row grid
  python benchmarks/bench_decode.py --rows all --out out/bench       # grid + extra rows
  python benchmarks/bench_decode.py --quick                          # a few rows
  python benchmarks/bench_decode.py --rerender out/bench/results.json --out out/bench  # no GPU: rebuild the
                                                                     # tables (card ceilings, FLASHMLA_COMMIT)
  python benchmarks/bench_decode.py --dry-run --rows all --out /tmp/b  # no GPU: rows, formulas, anchors,
                                                                     # tables/plot from FAKE times, CPU smoke
Writes results.json, results.md (the table for BENCHMARKS.md) and plot.png into --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `benchmarks.common`

from benchmarks import common as C  # noqa: E402

import torch  # noqa: E402


@dataclass(frozen=True)
class Row:
    s_k: int
    h_q: int
    s_q: int
    varlen: bool
    page: int = 64
    b: int = 128
    group: str = "grid"  # grid | extra | pages | qrows

    @property
    def anchor_key(self):
        return (self.b, self.s_q, self.s_k, self.h_q, int(self.varlen)) if self.page == 64 else None

    def label(self) -> str:
        s = f"{self.s_k}/{self.h_q}/{self.s_q}/{'V' if self.varlen else 'F'}"
        return s if self.page == 64 else s + f"/p{self.page}"


def grid_rows(b: int = 128) -> List[Row]:
    """FlashMLA's grid, in the anchor CSV's order."""
    return [
        Row(s_k, h_q, s_q, bool(v), 64, b, "grid")
        for s_k in (4096, 8192)
        for h_q in (16, 32, 64, 128)
        for s_q in (1, 2)
        for v in (0, 1)
    ]


def extra_rows(b: int = 128) -> List[Row]:
    """Other page sizes and longer speculative-decoding queries (no anchors)."""
    rows = [Row(4096, h_q, 1, False, page, b, "extra") for page in (16, 128) for h_q in (16, 128)]
    rows += [Row(4096, h_q, s_q, False, 64, b, "extra") for s_q in (4, 8) for h_q in (16, 128)]
    rows += [Row(4096, 128, 4, True, 64, b, "extra"), Row(4096, 16, 8, True, 16, b, "extra")]
    return rows


def page_rows(b: int = 128) -> List[Row]:
    """Pages that are not a multiple of 64 tokens (the Hopper kernel gathers them with cp.async; SGLang's
    default is 1-token pages), at 16 / 64 / 128 query rows (no anchors)."""
    return [Row(4096, h_q, 1, False, page, b, "pages") for page in (1, 2, 16, 48) for h_q in (16, 64, 128)]


# (h_q, s_q) pairs of the "qrows" group: 16 to 256 query rows per KV head, with the counts between the grid's
# powers of two (48, 80, 96, 160, 192; 96 and 192 both as more heads and as more query tokens).
QUERY_ROW_PAIRS = ((16, 1), (32, 1), (48, 1), (64, 1), (80, 1), (96, 1), (32, 3), (128, 1), (160, 1), (192, 1),
                   (64, 3), (128, 2))


def query_row_rows(b: int = 128) -> List[Row]:
    """Issue 4's "no cliff past 64 query rows": s_k=4096 fixed, page 64, over QUERY_ROW_PAIRS (no anchors);
    the table beside the main one (query_rows_markdown) sets each row's time against the 64-row row's."""
    return [Row(4096, h_q, s_q, False, 64, b, "qrows") for h_q, s_q in QUERY_ROW_PAIRS]


def quick_rows(b: int = 128) -> List[Row]:
    return [
        Row(4096, 16, 1, False, b=b),
        Row(4096, 128, 1, False, b=b),
        Row(8192, 64, 1, True, b=b),
        Row(4096, 128, 2, True, b=b),
        Row(4096, 16, 1, False, 16, b, "extra"),
        Row(4096, 128, 8, False, 64, b, "extra"),
    ]


def select_rows(which: str, quick: bool, b: int) -> List[Row]:
    if quick:
        rows = quick_rows(b)
        return [r for r in rows if which == "all" or r.group == which]
    groups = {"grid": grid_rows, "extra": extra_rows, "pages": page_rows, "qrows": query_row_rows}
    if which == "all":
        return grid_rows(b) + extra_rows(b)
    return groups[which](b)


# --------------------------------------------------------------------------------------------------


def fake_us(n_flops: float, n_bytes: float, ceil: Dict) -> float:
    """--dry-run's stand-in time: a roofline at 90% of the copy ceiling / 70% of the matmul ceiling + 5 us."""
    return max(n_bytes / (0.9 * ceil["gbs"] * 1e9), n_flops / (0.7 * ceil["tflops"] * 1e12)) * 1e6 + 5.0


def evaluate_targets(rec: Dict) -> List[str]:
    """DESIGN §6 targets a row misses (empty list: all met)."""
    misses = []
    if rec.get("flashmla_us") and rec["vs_flashmla"] < 1.0:
        misses.append("slower than FlashMLA")
    if rec.get("triton4_us") and rec["us"] > rec["triton4_us"]:
        misses.append("slower than Triton")
    if rec["bound"] == "memory" and rec["gbs"] < C.TARGET_MEMBOUND_GBS:
        misses.append(f"< {C.TARGET_MEMBOUND_GBS:.0f} GB/s")
    if rec["bound"] == "compute" and rec["tflops"] < C.TARGET_COMPUTEBOUND_TFLOPS:
        misses.append(f"< {C.TARGET_COMPUTEBOUND_TFLOPS:.0f} TFLOP/s")
    return misses


def base_record(row: Row, anchors: Dict) -> Dict:
    lengths = C.make_seqlens(row.b, row.s_k, row.s_q, row.varlen)
    rec = asdict(row)
    rec.update(
        label=row.label(),
        bound=C.bound_kind(row.h_q, row.s_q),
        sum_seqlens=sum(lengths),
        max_seqlen=max(lengths),
        flops=C.flops(row.b, row.s_q, row.h_q, lengths),
        bytes=C.bytes_moved(row.b, row.s_q, row.h_q, lengths),
    )
    key = row.anchor_key
    fm = anchors["flashmla"].get(key) if key else None
    tr = anchors["triton"].get(key) if key else None
    rec["flashmla_us"] = fm["flashmla_us"] if fm else None
    rec["triton4_us"] = tr["triton4_us"] if tr else None
    rec["triton16_us"] = tr["triton16_us"] if tr else None
    for name in ("flashmla", "triton4"):
        us = rec[f"{name}_us"]
        rec[f"{name}_tflops"], rec[f"{name}_gbs"] = (
            C.rates(us, rec["flops"], rec["bytes"]) if us else (None, None)
        )
    return rec


def finish_record(rec: Dict, us: float, ceil: Dict) -> Dict:
    """Rates, percent of the card's ceilings (C.ceilings_for), ratios to the anchors, target misses."""
    rec["us"] = us
    rec["tflops"], rec["gbs"] = C.rates(us, rec["flops"], rec["bytes"])
    rec["pct_bw"] = 100.0 * rec["gbs"] / ceil["gbs"]
    rec["pct_flops"] = 100.0 * rec["tflops"] / ceil["tflops"]
    rec["vs_flashmla"] = rec["flashmla_us"] / us if rec["flashmla_us"] else None
    rec["vs_triton4"] = rec["triton4_us"] / us if rec["triton4_us"] else None
    rec["target_misses"] = evaluate_targets(rec)
    return rec


def run_row(row: Row, anchors: Dict, args, kwargs: dict, ceil: Dict) -> Dict:
    rec = base_record(row, anchors)
    rec.update(status="ok", us=None)
    graph = None
    try:
        inp = C.build_inputs(
            row.b,
            row.s_q,
            row.h_q,
            C.make_seqlens(row.b, row.s_k, row.s_q, row.varlen),
            page=row.page,
            dtype=torch.bfloat16,
            device="cuda",
            causal=True,
            seed=0,
        )
        # `us` times the attention call alone (as FlashMLA's test does); `step_us` the whole decode
        # step with get_mla_metadata inside the graph.
        step = C.decode_step(inp, kwargs, include_metadata=False)
        timer = args.timer
        if timer == "graph":
            try:
                us, times, (out, lse), graph = C.time_cuda_graph(step, args.iters, args.warmup)
            except Exception as e:  # capture refused (host sync, unsupported op): time plain calls instead
                rec["graph_error"] = f"{type(e).__name__}: {e}"
                torch.cuda.synchronize()
                timer = "events"
        if timer == "events":
            us, times, (out, lse), _ = C.time_cuda_events(step, args.iters, args.warmup)
        rec["timer"] = timer
        rec["times_us"] = {"min": min(times), "max": max(times), "n": len(times)}
        if timer == "graph":
            full = C.time_cuda_graph(
                C.decode_step(inp, kwargs, include_metadata=True), args.iters, args.warmup
            )
            rec["step_us"] = full[0]
            del full
        check = C.spot_check(inp, out, lse)
        rec["check"] = check
        if not check["ok"]:
            rec.update(status="check failed", us_unverified=us)
        else:
            finish_record(rec, us, ceil)
    except Exception as e:
        rec.update(
            status=f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            traceback=traceback.format_exc(),
        )
    finally:
        del graph
        gc.collect()
        torch.cuda.empty_cache()
    return rec


def dry_row(row: Row, anchors: Dict, ceil: Dict) -> Dict:
    rec = base_record(row, anchors)
    rec.update(status="ok (FAKE time)", timer="fake", check={"ok": None})
    return finish_record(rec, fake_us(rec["flops"], rec["bytes"], ceil), ceil)


def cpu_smoke(rows: List[Row], kwargs: dict) -> List[Dict]:
    """--dry-run: the real input builder, decode step and spot check, on CPU with shrunk shapes."""
    seen, results = set(), []
    for row in rows:
        shape = (row.h_q, row.s_q, row.varlen, row.page)
        if shape in seen:
            continue
        seen.add(shape)
        b, s_k = 3, 200  # not a page multiple: live tails inside a block
        inp = C.build_inputs(
            b,
            row.s_q,
            row.h_q,
            C.make_seqlens(b, s_k, row.s_q, row.varlen),
            page=row.page,
            dtype=torch.bfloat16,
            device="cpu",
            causal=True,
            seed=0,
        )
        out, lse = C.decode_step(inp, kwargs)()
        check = C.spot_check(inp, out, lse)
        results.append(
            {
                "h_q": row.h_q,
                "s_q": row.s_q,
                "varlen": row.varlen,
                "page": row.page,
                "b": b,
                "seqlens": inp.seqlens,
                "check": check,
            }
        )
    return results


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _f(x, fmt="{:.1f}", none="—"):
    return none if x is None else fmt.format(x)


def geomean(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def markdown(meta: Dict, records: List[Dict]) -> str:
    fake = meta.get("dry_run")
    lines = [
        f"### Decode: {meta['device_name']}, bf16, {meta['timer_desc']}"
        + (" — FAKE TIMES (dry run)" if fake else ""),
        "",
        f"b=128 (unless noted), d=576, dv=512, h_kv=1, causal; lengths fixed = s_k, varlen ~ max(N(s_k, s_k/2), s_q) "
        f"(random.seed(0) per row). FLOPs = 2·s_q·Σlen·h_q·(d+dv), bytes = 2·(Σlen·h_kv·d + b·s_q·h_q·(d+dv)). "
        f"Ceilings ({meta['ceilings']['card']}) {meta['ceilings']['gbs']:.0f} GB/s, {meta['ceilings']['tflops']:.0f} "
        f"TFLOP/s; targets (DESIGN §6, set on the H100) >= {C.TARGET_MEMBOUND_GBS:.0f} GB/s / "
        f"{C.TARGET_COMPUTEBOUND_TFLOPS:.0f} TFLOP/s. FlashMLA / Triton (vLLM, 4 KV splits): "
        f"anchors measured on H100 80GB HBM3 ({', '.join(Path(p).name for p in meta['anchor_paths'].values() if p)}). "
        f"Build: `{json.dumps(meta.get('build_info'))}`; kernel: {meta.get('kernel', 'auto')}; "
        f"torch {meta['torch']}; commit {meta.get('git_commit') or '?'}; {meta['date']}.",
        "",
        "`us` times flash_mla_with_kvcache alone (metadata built once outside, as FlashMLA's test does); "
        "`step us` is the whole decode step with get_mla_metadata inside the graph.",
        "",
        "| s_k | h_q | s_q | lengths | page | us | step us | TFLOP/s | GB/s | % BW | % FLOP | FlashMLA us | FlashMLA/ours "
        "| Triton us | Triton/ours | targets | check |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        head = (
            f"| {r['s_k']} | {r['h_q']} | {r['s_q']} | {'varlen' if r['varlen'] else 'fixed'} | {r['page']}"
            + ("" if r["b"] == 128 else f" (b={r['b']})")
        )
        if r.get("us") is None:
            status = r["status"]
            if status == "check failed":
                c = r["check"]
                status = f"**check FAILED** (out_err {c['out_err']:.2g}, lse_err {c['lse_err']:.2g}, finite {c['finite']})"
            lines.append(
                f"{head} | — | — | — | — | — | — | {_f(r['flashmla_us'])} | — | {_f(r['triton4_us'])} | — | — | {status} |"
            )
            continue
        chk = r.get("check") or {}
        check = "fake" if chk.get("ok") is None else ("ok" if chk["ok"] else "FAIL")
        if chk.get("ok"):
            check += f" ({chk['out_err']:.1e})"
        targets = "ok" if not r["target_misses"] else "miss: " + "; ".join(r["target_misses"])
        lines.append(
            f"{head} | {r['us']:.1f} | {_f(r.get('step_us'))} | {r['tflops']:.0f} | {r['gbs']:.0f} | {r['pct_bw']:.0f} | {r['pct_flops']:.0f} "
            f"| {_f(r['flashmla_us'])} | {_f(r['vs_flashmla'], '{:.2f}x')} | {_f(r['triton4_us'])} "
            f"| {_f(r['vs_triton4'], '{:.2f}x')} | {targets} | {check} |"
        )
    s = meta["summary"]
    lines += [
        "",
        f"Rows timed and checked: {s['rows_ok']}/{s['rows']}; meeting every target: {s['rows_meeting_targets']}. "
        f"Geometric mean FlashMLA/ours over anchored rows: {_f(s['geomean_vs_flashmla'], '{:.3f}x')} "
        f"(min {_f(s['min_vs_flashmla'], '{:.3f}x')}); Triton/ours: {_f(s['geomean_vs_triton4'], '{:.2f}x')}.",
    ]
    lines += query_rows_markdown(records)
    return "\n".join(lines) + "\n"


def query_rows_markdown(records: List[Dict]) -> List[str]:
    """For the "qrows" rows: time against the 64-row row's, beside the rows' ratio (a cliff is a time ratio
    above the rows' ratio: more than proportional). Empty when those rows or the 64-row one have no time."""
    rows = sorted(
        (r for r in records if r.get("group") == "qrows" and r.get("us") is not None),
        key=lambda r: (r["h_q"] * r["s_q"], r["s_q"]),
    )
    base = next((r for r in rows if r["h_q"] * r["s_q"] == 64), None)
    if base is None:
        return []
    lines = [
        "",
        f"Query rows per KV head (h_q*s_q; s_k=4096 fixed, page 64): time against the 64-row row's "
        f"({base['us']:.1f} us). In proportion: the time ratio is at most the rows' ratio.",
        "",
        "| rows | h_q | s_q | us | TFLOP/s | GB/s | us / us(64) | rows / 64 | in proportion |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        n = r["h_q"] * r["s_q"]
        t_ratio, n_ratio = r["us"] / base["us"], n / 64
        verdict = "—" if n <= 64 else ("yes" if t_ratio <= n_ratio else "**no**")
        lines.append(
            f"| {n} | {r['h_q']} | {r['s_q']} | {r['us']:.1f} | {r['tflops']:.0f} | {r['gbs']:.0f} "
            f"| {t_ratio:.2f} | {n_ratio:.2f} | {verdict} |"
        )
    return lines


def summarize(records: List[Dict]) -> Dict:
    ok = [r for r in records if r.get("us") is not None]
    vs_fm = [r["vs_flashmla"] for r in ok if r.get("vs_flashmla")]
    vs_tr = [r["vs_triton4"] for r in ok if r.get("vs_triton4")]
    return {
        "rows": len(records),
        "rows_ok": len(ok),
        "rows_meeting_targets": sum(1 for r in ok if not r["target_misses"]),
        "geomean_vs_flashmla": geomean(vs_fm),
        "min_vs_flashmla": min(vs_fm) if vs_fm else None,
        "geomean_vs_triton4": geomean(vs_tr),
    }


def plot(records: List[Dict], path: Path, title: str, ceil: Dict) -> Optional[str]:
    """Bars per row, ours vs FlashMLA vs Triton: GB/s (top, copy ceiling) and TFLOP/s (bottom, matmul ceiling)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped"
    labels = [r["label"] for r in records]
    x = list(range(len(records)))
    width = 0.27
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.45 * len(records) + 3), 9), sharex=True)
    for ax, unit, key, ceiling in (
        (axes[0], "GB/s", "gbs", ceil["gbs"]),
        (axes[1], "TFLOP/s", "tflops", ceil["tflops"]),
    ):
        series = (
            ("ours", key, "tab:green"),
            ("FlashMLA", f"flashmla_{key}", "tab:blue"),
            ("Triton (4 splits)", f"triton4_{key}", "tab:orange"),
        )
        for j, (name, k, color) in enumerate(series):
            vals = [r.get(k) or 0.0 for r in records]
            ax.bar([i + (j - 1) * width for i in x], vals, width, label=name, color=color)
        ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1)
        ax.text(-0.5, ceiling, f" ceiling {ceiling:.0f}", ha="left", va="bottom", fontsize=8, color="gray")
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(labels, rotation=70, fontsize=7)
    axes[1].set_xlabel("s_k / h_q / s_q / F(ixed)|V(arlen) [/ page]")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def git_commit() -> Optional[str]:
    """HEAD of the checkout, or $FLASHMLA_COMMIT when set (a copied tree may carry a stale .git)."""
    if os.environ.get("FLASHMLA_COMMIT"):
        return os.environ["FLASHMLA_COMMIT"]
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=C.REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------


def write_outputs(meta: Dict, records: List[Dict], out_dir: Optional[str]) -> None:
    """Prints the markdown table; with out_dir, writes results.json, results.md and plot.png there."""
    md = markdown(meta, records)
    print()
    print(md)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.json", "w") as f:
            json.dump({"meta": meta, "rows": records}, f, indent=1)
        (out / "results.md").write_text(md)
        title = f"MLA decode, {meta['device_name']}, bf16" + (" (FAKE times)" if meta.get("dry_run") else "")
        msg = plot(records, out / "plot.png", title, meta["ceilings"])
        print(msg or f"wrote {out / 'plot.png'}")
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}")


def rerender(results_json: str, out_dir: Optional[str]) -> int:
    """Rebuilds the tables and plot of a results.json (no GPU): the card's ceilings from C.ceilings_for,
    the commit from $FLASHMLA_COMMIT when set (a tree copied to the GPU machine may carry a stale .git)."""
    data = json.loads(Path(results_json).read_text())
    meta, records = data["meta"], data["rows"]
    meta["ceilings"] = C.ceilings_for(meta["device_name"])
    if os.environ.get("FLASHMLA_COMMIT"):
        meta["git_commit"] = os.environ["FLASHMLA_COMMIT"]
    for rec in records:
        if rec.get("us") is not None:
            finish_record(rec, rec["us"], meta["ceilings"])
    meta["summary"] = summarize(records)
    write_outputs(meta, records, out_dir)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rows",
        choices=("grid", "extra", "pages", "qrows", "all"),
        default="grid",
        help="all = grid + extra (pages: the gather-page rows, and qrows: 16-256 query rows per KV head, apart)",
    )
    p.add_argument("--quick", action="store_true", help="a few representative rows (of --rows)")
    p.add_argument("--out", default=None, help="directory for results.json, results.md, plot.png")
    p.add_argument(
        "--device-name", default=None, help="name for the tables (default torch.cuda.get_device_name)"
    )
    p.add_argument(
        "--kernel",
        default=None,
        choices=["auto", "portable", "sm90"],
        help="CUDA decode kernel (exported as FLASHMLA_KERNEL; default: the environment's, else auto)",
    )
    p.add_argument("--timer", choices=("graph", "events"), default="graph")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--anchors", default=None, help="directory holding the anchor CSVs (default: searched)")
    p.add_argument(
        "--dry-run", action="store_true", help="no GPU: FAKE times, plus a CPU smoke test of the pipeline"
    )
    p.add_argument(
        "--rerender",
        default=None,
        metavar="RESULTS_JSON",
        help="no run: rebuild the tables of a results.json into --out",
    )
    args = p.parse_args(argv)
    if args.rerender:
        return rerender(args.rerender, args.out)

    C.set_kernel_env(args.kernel)
    anchors = C.load_anchors(args.anchors)
    problems = C.check_anchor_consistency(anchors)
    if not anchors["paths"]["flashmla"]:
        print(
            "warning: FlashMLA anchor CSV not found (looked in " + ", ".join(map(str, C.anchor_dirs())) + ")",
            file=sys.stderr,
        )
    for line in problems:
        print("warning: anchor mismatch: " + line, file=sys.stderr)

    rows = select_rows(args.rows, args.quick, args.batch)
    build_info, kwargs = None, {}
    try:
        import flashmla_ops

        build_info = flashmla_ops.build_info()
    except Exception as e:
        if not args.dry_run:
            raise
        print(f"note: flashmla_ops not importable ({e}); the CPU smoke test is skipped", file=sys.stderr)

    if not args.dry_run:
        if not torch.cuda.is_available():
            print(
                "error: no CUDA device (use --dry-run to exercise the harness without one)", file=sys.stderr
            )
            return 2
        if not (build_info or {}).get("cuda"):
            print("error: flashmla_ops was built without CUDA kernels", file=sys.stderr)
            return 2
    device_name = args.device_name or (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)"
    )
    meta = {
        "device_name": device_name,
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "build_info": build_info,
        "kernel": os.environ.get("FLASHMLA_KERNEL", "auto"),
        "timer": args.timer,
        "iters": args.iters,
        "warmup": args.warmup,
        "timer_desc": (
            "FAKE roofline times"
            if args.dry_run
            else ("CUDA-graph replay" if args.timer == "graph" else "CUDA events")
            + f", median of {args.iters}"
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
        "anchor_paths": anchors["paths"],
        "anchor_problems": problems,
        "ceilings": C.ceilings_for(device_name),
        "formulas": {
            "flops": "2*s_q*sum(seqlens)*h_q*(d+dv)",
            "bytes": "2*(sum(seqlens)*h_kv*d + b*s_q*h_q*(d+dv))",
        },
        "argv": sys.argv[1:],
    }
    if not args.dry_run:
        props = torch.cuda.get_device_properties(0)
        meta["sm_count"] = props.multi_processor_count

    records = []
    ceil = meta["ceilings"]
    for i, row in enumerate(rows):
        rec = dry_row(row, anchors, ceil) if args.dry_run else run_row(row, anchors, args, kwargs, ceil)
        records.append(rec)
        shown = (
            f"{rec['us']:8.1f} us {rec['tflops']:6.0f} TFLOP/s {rec['gbs']:6.0f} GB/s"
            if rec.get("us") is not None
            else rec["status"]
        )
        vs = f"  FlashMLA/ours {rec['vs_flashmla']:.2f}x" if rec.get("vs_flashmla") else ""
        print(f"[{i + 1}/{len(rows)}] {rec['label']:<18} {shown}{vs}", flush=True)
    meta["summary"] = summarize(records)

    if args.dry_run and build_info is not None:
        smoke = cpu_smoke(rows, kwargs)
        meta["cpu_smoke"] = smoke
        bad = [s for s in smoke if not s["check"]["ok"]]
        print(
            f"CPU smoke (shrunk shapes b=3 s_k=200): {len(smoke) - len(bad)}/{len(smoke)} checks ok",
            flush=True,
        )
        for s in bad:
            print(f"  FAILED: {s}", file=sys.stderr)

    write_outputs(meta, records, args.out)
    failed = [r for r in records if r.get("us") is None]
    smoke_bad = [s for s in meta.get("cpu_smoke", []) if not s["check"]["ok"]]
    return 1 if failed or smoke_bad else 0


if __name__ == "__main__":
    sys.exit(main())
