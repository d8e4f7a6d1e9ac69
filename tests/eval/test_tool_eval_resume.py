"""The tool-use eval (BFCL) resumes from its saved per-entry parts, as the maths eval does (the same storage,
eval/stage.py `open_sample_parts`): after a kill, a part cut short and a part never written are sampled again,
every other entry is read back (not re-generated), nothing is lost or duplicated, and the result equals the
uninterrupted run's. A real (untrained) tiny model sampled greedily with HF on CPU, twin entries in BFCL's layout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.orchestrator.runner import run_pipeline

pytestmark = pytest.mark.slow  # 3 short eval runs of 12 entries x 6 tokens: ~20 s on 2 cores

if importlib.util.find_spec("bfcl_eval") is None:
    pytest.skip("bfcl-eval is not installed (make install)", allow_module_level=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    from eksft_pipeline.data.tiny_assets import make_tiny_assets
    from eksft_pipeline.data.tool_use.tiny import make_tiny_tool_data

    out = tmp_path_factory.mktemp("assets")
    make_tiny_assets(out, n_problems=200, n_eval_per_source=4, n_pretrain=20, pretrain=False, progress=False)
    bfcl_dir = make_tiny_tool_data(out / "twin", n_train=10, n_eval_per_category=2, seed=3)["bfcl"]
    return out, Path(bfcl_dir)


def _eval(run: Path, setup, *extra: str):
    assets, bfcl_dir = setup
    cfg = compose_pipeline(
        "task=tool_use", "stage=eval", "init=base", "task.eval.targets=[base]", f"run_dir={run}",
        f"model.assets_dir={assets}", f"model.path={assets / 'model'}", f"model.tool_use.eval_source={bfcl_dir}",
        "model.tool_use.max_response_length=6", "task.eval.bootstrap=10", *extra,
    )  # fmt: skip
    res = run_pipeline(cfg)
    assert res[0]["status"] == "complete"
    return res[0]


def test_killed_tool_eval_resumes_from_its_parts(setup, tmp_path, capsys):
    run = tmp_path / "run"
    _eval(run, setup)
    tdir = run / "eval" / "base" / "base"
    first = pd.read_parquet(tdir / "samples.parquet")
    metrics = json.loads((tdir / "metrics.json").read_text())["bfcl"]
    parts = sorted((tdir / "samples").glob("part-*.parquet"))
    assert len(first) == 12 and len(parts) == 12  # 6 categories x 2 entries, one part per entry
    assert "sampling 12 of 12" in capsys.readouterr().out

    # a kill mid-eval: the stage is left 'running', one part cut short, one never written, a temporary left behind
    data = parts[3].read_bytes()
    parts[3].write_bytes(data[: len(data) // 2])
    gone = pd.read_parquet(parts[7]).problem_id.tolist()
    parts[7].unlink()
    (tdir / "samples" / ".part-000012.parquet.tmp-999").write_bytes(b"PAR1 half")
    (tdir / "samples.parquet").unlink()
    Manifest(run).update("eval/base", status="running")
    _eval(run, setup, "task.eval.bootstrap=20")  # another config: the parts carry their own key, kept
    out = capsys.readouterr().out
    assert f"{parts[3].name} is unreadable" in out and "sampling 2 of 12" in out, out
    rows = pd.concat([pd.read_parquet(f) for f in sorted((tdir / "samples").glob("part-*.parquet"))])
    assert len(rows) == 12 and rows.problem_id.is_unique  # nothing lost, nothing generated twice
    assert set(gone) <= set(rows.problem_id)
    assert not list((tdir / "samples").glob(".*"))
    again = pd.read_parquet(tdir / "samples.parquet")
    pd.testing.assert_frame_equal(again, first)  # greedy: the resampled entries are the same completions
    m2 = json.loads((tdir / "metrics.json").read_text())["bfcl"]
    assert {c: v["correct"] for c, v in m2["categories"].items()} == {c: v["correct"] for c, v in
                                                                        metrics["categories"].items()}  # fmt: skip
    assert m2["rates"] == metrics["rates"]

    # everything saved: scored from the parts, nothing sampled
    (tdir / "samples.parquet").unlink()
    Manifest(run).update("eval/base", status="running")
    _eval(run, setup, "task.eval.bootstrap=30")
    assert "all 12 entries saved" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(tdir / "samples.parquet"), first)
