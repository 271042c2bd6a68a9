"""The decode benchmark's bookkeeping, without a GPU: the ceilings each card's percentages are taken
against (benchmarks/common.py ceilings_for), and --rerender, which rebuilds a run's tables from its
results.json with the card's ceilings and a given commit (bench_decode.py)."""

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_decode  # noqa: E402
from benchmarks import common  # noqa: E402


@pytest.mark.parametrize(
    "name,card,gbs",
    [
        ("NVIDIA H200", "H200", 4224.9),
        ("NVIDIA H100 80GB HBM3", "H100", 3004.0),
        ("NVIDIA A100-SXM4-80GB", None, 3004.0),
    ],
)
def test_ceilings_for(name, card, gbs):
    """A known card gets its own measured figures; any other gets the H100's and says so."""
    ceil = common.ceilings_for(name)
    assert ceil["gbs"] == gbs
    if card is None:
        assert "no figures for this card" in ceil["card"]
    else:
        assert ceil["card"] == card


def test_rerender_uses_the_cards_ceilings(tmp_path, monkeypatch):
    """A results.json rendered for one card, re-rendered for an H200: every row's percent of the copy
    ceiling is recomputed against the H200's figure, times and checks stay, the commit is the given one."""
    rows = [bench_decode.Row(4096, 16, 1, False), bench_decode.Row(4096, 128, 2, True)]
    anchors = common.load_anchors()
    h100 = common.ceilings_for("NVIDIA H100 80GB HBM3")
    records = [bench_decode.dry_row(row, anchors, h100) for row in rows]
    meta = {
        "device_name": "NVIDIA H200",
        "timer_desc": "CUDA-graph replay, median of 50",
        "anchor_paths": anchors["paths"],
        "torch": "x",
        "date": "2026-12-01",
        "git_commit": "stale",
        "ceilings": h100,
    }
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"meta": meta, "rows": records}))
    monkeypatch.setenv("FLASHMLA_COMMIT", "abc1234")
    assert bench_decode.rerender(str(src), str(tmp_path / "out")) == 0
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert out["meta"]["ceilings"]["card"] == "H200" and out["meta"]["git_commit"] == "abc1234"
    for before, after in zip(records, out["rows"]):
        assert after["us"] == before["us"]
        assert after["pct_bw"] == pytest.approx(100.0 * before["gbs"] / 4224.9)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "Ceilings (H200) 4225 GB/s" in table and "commit abc1234" in table


def test_stall_summary(tmp_path):
    """scripts/stall_summary.py on a small source-page export: shares per reason and per instruction
    are the samples over all samples, offsets are from the kernel's first instruction, predicated
    instructions count under their opcode."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import stall_summary

    header = [
        "Address",
        "Source",
        stall_summary.TOTAL,
        "stall_long_sb",
        "stall_barrier",
        "stall_long_sb (Not Issued)",
    ]
    rows = [
        ["0x1000", "  LDC R1, c[0x0][0x28]", "10", "0", "10", "0"],
        ["0x1010", "  @!P0 BRA 0x2000", "30", "30", "0", "30"],
        ["0x1020", "  WARPGROUP.DEPBAR.LE gsb0, 0x0", "60", "0", "60", "0"],
    ]
    path = tmp_path / "sass.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["Kernel Name", "k"])
        w.writerow(header)
        w.writerows(rows)
    text = stall_summary.summarize(str(path), top=2)
    assert "warp-stall samples: 100" in text
    assert "| barrier | 70 | 70.0% |" in text and "| long_sb | 30 | 30.0% |" in text
    assert "| 0x20 | 60.0% | barrier | `WARPGROUP.DEPBAR.LE gsb0, 0x0` |" in text
    assert "| 0x10 | 30.0% | long_sb | `@!P0 BRA 0x2000` |" in text
    assert "LDC R1" not in text.split("| opcode |")[0]  # top=2 leaves the third out
    assert "| BRA | 30.0% |" in text and "| WARPGROUP | 60.0% |" in text
    bad = tmp_path / "bad.csv"
    bad.write_text('"a","b"\n"1","2"\n')
    with pytest.raises(SystemExit, match="not a source-page export"):
        stall_summary.summarize(str(bad))


def test_row_groups():
    """bench_decode.py --rows: the 32-row grid in the anchors' order; "pages" rows are gather pages (not a
    multiple of 64 tokens) with unique labels and no anchor, and stay out of "all" (grid + extra)."""
    grid = bench_decode.select_rows("grid", False, 128)
    assert len(grid) == 32 and all(r.page == 64 and r.anchor_key for r in grid)
    pages = bench_decode.select_rows("pages", False, 128)
    assert pages and all(r.page % 64 and r.anchor_key is None for r in pages)
    assert len({r.label() for r in pages}) == len(pages)
    assert {1, 2}.issubset({r.page for r in pages})
    everything = bench_decode.select_rows("all", False, 128)
    assert everything == grid + bench_decode.select_rows("extra", False, 128)
    assert not set(pages) & set(everything)


def test_query_row_rows_and_their_table():
    """--rows qrows: 16-256 query rows per KV head (96 and 192 two ways), unique labels, not in "all" (the
    grid's shapes among them keep their anchors); the table beside the main one sets each time against the
    64-row row's and calls a time ratio above the rows' ratio a cliff ("no")."""
    rows = bench_decode.select_rows("qrows", False, 128)
    counts = sorted(r.h_q * r.s_q for r in rows)
    assert counts[0] == 16 and counts[-1] == 256 and counts.count(96) == 2 and counts.count(192) == 2
    assert len({r.label() for r in rows}) == len(rows)
    everything = bench_decode.select_rows("all", False, 128)
    assert not set(rows) & set(everything)
    ceil = common.ceilings_for("NVIDIA H200")
    records = [bench_decode.dry_row(r, {"flashmla": {}, "triton": {}}, ceil) for r in rows]
    by_rows = {(r["h_q"], r["s_q"]): r for r in records}
    by_rows[(64, 1)]["us"] = 100.0
    by_rows[(96, 1)]["us"] = 140.0  # 1.40 <= 1.50: in proportion
    by_rows[(32, 3)]["us"] = 160.0  # 1.60 > 1.50: a cliff
    table = "\n".join(bench_decode.query_rows_markdown(records))
    assert "| 96 | 96 | 1 | 140.0 |" in table and "| 1.40 | 1.50 | yes |" in table
    assert "| 96 | 32 | 3 | 160.0 |" in table and "| 1.60 | 1.50 | **no** |" in table
    assert bench_decode.query_rows_markdown([r for r in records if r["h_q"] * r["s_q"] != 64]) == []


def test_env_ab_rows():
    """scripts/env_ab.py rows: 'h_q,s_q,s_k,varlen[,page]', page 64 unless given; anything else raises."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import env_ab

    assert env_ab.parse_row("64,1,4096,1") == (64, 1, 4096, 1, 64)
    assert env_ab.parse_row("16,2,8192,0,16") == (16, 2, 8192, 0, 16)
    for bad in ["64,1,4096", "64,1,4096,1,16,3"]:
        with pytest.raises(ValueError, match="h_q,s_q,s_k,varlen"):
            env_ab.parse_row(bad)


def test_ab_build_compare(tmp_path):
    """scripts/ab_build_compare.py: rounds in round order (10 after 2), directories only (not the .log
    beside them), rows every round of both sides timed, base / tree of the medians, a summary line, and
    --field's other time (step_us)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import ab_build_compare

    def write(which, rnd, times):
        d = tmp_path / f"ab_build_{which}_{rnd}"
        d.mkdir()
        rows = [{"label": k, "us": v, "step_us": v + 30.0} for k, v in times.items()]
        (d / "results.json").write_text(json.dumps({"meta": {}, "rows": rows}))
        (tmp_path / f"ab_build_{which}_{rnd}.log").write_text("log")

    write("tree", 1, {"a": 100.0, "b": 200.0, "c": 1.0})
    write("tree", 2, {"a": 102.0, "b": 210.0})
    write("tree", 10, {"a": 101.0, "b": 190.0, "c": 1.0})
    for rnd, a in ((1, 110.0), (2, 111.0), (10, 109.0)):
        write("base", rnd, {"a": a, "b": 200.0, "c": 1.0})
    tree = ab_build_compare.rounds_of(tmp_path, "tree")
    assert [r["a"] for r in tree] == [100.0, 102.0, 101.0]
    rows = ab_build_compare.compare(tree, ab_build_compare.rounds_of(tmp_path, "base"))
    assert [r[0] for r in rows] == ["a", "b"]  # "c" is missing from tree round 2
    assert rows[0][3] == pytest.approx(110.0 / 101.0)
    assert rows[1][3] == pytest.approx(1.0)
    table = ab_build_compare.markdown(rows)
    assert "| a | 100.0 | 102.0 | 101.0 | 110.0 | 111.0 | 109.0 | 1.089x |" in table
    assert table.endswith("max 1.089x")
    step = ab_build_compare.rounds_of(tmp_path, "tree", "step_us")  # the whole step's times
    assert [r["a"] for r in step] == [130.0, 132.0, 131.0]


def test_sched_sweep_schedule_is_the_librarys():
    """scripts/sched_sweep.py rebuilds csrc/schedule.h's schedule in Python: at the library's knobs it equals
    get_mla_metadata's (CPU, several worker counts), and its cut tolerance keeps whole a sequence that overruns
    a worker's budget by at most that many blocks (128 sequences of 4096 tokens over 66 workers, fixed cost 3:
    each second sequence overruns by 1 block)."""
    import torch

    import flashmla_ops
    from tests.helpers import num_threads

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import sched_sweep

    for rows in (16, 64, 128):
        for varlen in (False, True):
            lens = common.make_seqlens(128, 4096, 1, varlen)
            for parts in (1, 7, 66, 132):
                with num_threads(parts):
                    md, splits = flashmla_ops.get_mla_metadata(torch.tensor(lens, dtype=torch.int32), rows, 1)
                assert md.shape[0] == parts
                want = sched_sweep.schedule(lens, parts, *sched_sweep.library_knobs(rows))
                assert (md.tolist(), splits.tolist()) == want, (rows, varlen, parts)
    fixed = [4096] * 128
    assert sched_sweep.schedule(fixed, 66, 3, 0)[1][-1] == 190  # 62 sequences cut in two
    assert sched_sweep.schedule(fixed, 66, 3, 1)[1][-1] == 128  # none cut: two whole sequences a worker
