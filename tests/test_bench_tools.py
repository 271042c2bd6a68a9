"""The decode benchmark's bookkeeping, without a GPU: the ceilings each card's percentages are taken
against (benchmarks/common.py ceilings_for), and --rerender, which rebuilds a run's tables from its
results.json with the card's ceilings and a given commit (bench_decode.py)."""

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
