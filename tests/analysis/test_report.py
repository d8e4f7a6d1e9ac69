"""The report: tables against hand-computed values, figure / table files written, case study numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eksft_pipeline.eval.stage import metrics_for
from eksft_pipeline.pipeline.manifest import Manifest
from eksft_pipeline.pipeline.stage_api import StageContext
from eksft_pipeline.pipeline.verl_config import compose_pipeline


def _scores(correct: dict[str, np.ndarray]) -> pd.DataFrame:
    """Scored samples: correct[bench] is a [problems, n] bool matrix."""
    rows = []
    for bench, mat in correct.items():
        for p, row in enumerate(mat):
            for i, c in enumerate(row):
                rows.append({"benchmark": bench, "problem_id": f"{bench}-{p}", "sample_idx": i, "acc": bool(c),
                             "pred": "1" if c else "2", "finish_reason": "stop", "n_tokens": 10, "reason": "ok"})
    return pd.DataFrame(rows)


def _write_eval(run_dir: Path, man: Manifest, tag: str, targets: dict[str, dict[str, np.ndarray]], n: int):
    outputs = {}
    for target, correct in targets.items():
        d = run_dir / "eval" / tag / target
        d.mkdir(parents=True, exist_ok=True)
        m = {"target": target, "model": "x",
             "sampling": {"n": n, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64, "backend": "hf"},
             "benchmarks": metrics_for(_scores(correct), n, [1, 2, 4], n_boot=50, seed=0)}
        (d / "metrics.json").write_text(json.dumps(m))
        outputs[f"{target}_metrics"] = str(d / "metrics.json")
    man.start(f"eval/{tag}", {}, "h", {})
    man.complete(f"eval/{tag}", outputs, {})


def _write_sft(run_dir: Path, man: Manifest, method: str, iou: list[float]):
    d = run_dir / "sft" / method
    d.mkdir(parents=True, exist_ok=True)
    metrics = {str(s + 1): {"train/loss": 2.0 - 0.1 * s, "eksft/iou": v, "eksft/mask_frac": 0.3,
                            "eksft/entropy_mask": 1.0, "eksft/kl_mask": 0.1} for s, v in enumerate(iou)}
    (d / "metrics.json").write_text(json.dumps(metrics))
    drift = {"overall": {"n_params": 100, "rel_norm": 0.05, "frac_over": {"0.001": 0.9, "0.01": 0.5, "0.1": 0.1}}}
    (d / "drift.json").write_text(json.dumps(drift))
    man.start(f"sft/{method}", {}, "h", {})
    man.complete(f"sft/{method}", {"metrics": str(d / "metrics.json"), "drift": str(d / "drift.json")},
                 {"loss_first": 2.0})


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    rd = tmp_path / "run"
    man = Manifest(rd)
    rng = np.random.default_rng(0)
    n = 4
    eksft = {"aime24": rng.random((5, n)) < 0.5, "amc": rng.random((3, n)) < 0.3}
    sft = {"aime24": np.zeros((5, n), bool), "amc": np.ones((3, n), bool)}
    _write_eval(rd, man, "eksft", {"sft": eksft, "rl": sft}, n)
    _write_sft(rd, man, "eksft", [0.2, 0.25, 0.3, 0.35, 0.4, 0.45])
    _write_sft(rd, man, "sft", [])
    return rd


def _report(run_dir: Path):
    from eksft_pipeline.analysis.report import ReportStage

    cfg = compose_pipeline(f"run_dir={run_dir}", "report.case_study.enabled=false")
    ctx = StageContext(cfg=cfg, run_dir=run_dir, manifest=Manifest(run_dir), key="report")
    return ReportStage().run(ctx), cfg


def test_tables_match_hand_computed_values(run_dir):
    res, _ = _report(run_dir)
    out = run_dir / "report"
    m = json.loads((run_dir / "eval" / "eksft" / "sft" / "metrics.json").read_text())["benchmarks"]
    with open(out / "table_pass1.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"eksft (SFT)", "eksft (SFT→RL)"}
    r = rows["eksft (SFT)"]
    assert float(r["aime24"]) == pytest.approx(m["aime24"]["avg@n"])
    assert float(r["Avg"]) == pytest.approx((m["aime24"]["avg@n"] + m["amc"]["avg@n"]) / 2)
    # the RL row: aime24 all wrong, amc all right -> 0, 1, mean 0.5
    r = rows["eksft (SFT→RL)"]
    assert (float(r["aime24"]), float(r["amc"]), float(r["Avg"])) == (0.0, 1.0, 0.5)
    assert r["n"] == "4" and r["temperature"] == "1.0"
    # Table 2 is pass@n (n=4 < 32): the unbiased estimator with k = n is "any correct"
    with open(out / "table_passk.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    c = (np.random.default_rng(0).random((5, 4)) < 0.5).any(axis=1).mean()
    assert float(rows["eksft (SFT)"]["aime24"]) == pytest.approx(c)
    md = (out / "report.md").read_text()
    assert "Table 1: avg@n = pass@1" in md and "Table 2: pass@4" in md
    assert "| eksft (SFT→RL) | 0.0 | **100.0** | 50.0 |" in md
    assert res.outputs["report_md"] == str(out / "report.md")


def test_figures_and_iou_table_are_written(run_dir):
    res, _ = _report(run_dir)
    out = run_dir / "report"
    for name in ("pass_at_k.png", "drift.png", "sft_curves.png"):
        p = out / name
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 2000, name
    table = (out / "iou_table.md").read_text()
    # thirds of [0.2 .. 0.45]: early (0.2, 0.25), middle (0.3, 0.35), late (0.4, 0.45)
    assert "| eksft | 0.225 | 0.325 | 0.425 | 0.300 | 0.300 | 0.300 |" in table
    assert "| sft |" not in table  # logged no selection
    md = (out / "report.md").read_text()
    for stage in ("eval/eksft", "sft/eksft", "sft/sft"):
        assert f"| {stage} | complete |" in md
    rep = json.loads((out / "report.json").read_text())
    assert rep["drift"]["eksft"]["rel_norm"] == 0.05 and len(rep["evals"]) == 2


def test_report_reruns_when_a_result_changes(run_dir):
    from eksft_pipeline.analysis.report import ReportStage

    _, cfg = _report(run_dir)
    ctx = StageContext(cfg=cfg, run_dir=run_dir, manifest=Manifest(run_dir), key="report")
    before = ReportStage().inputs(ctx)
    assert any("eval/eksft:sft_metrics" in k for k in before)
    assert any("sft/eksft:drift" in k for k in before)


def test_missing_run_dir_is_a_clear_error(tmp_path):
    from eksft_pipeline.analysis.gather import gather

    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        gather([tmp_path / "nothing"])


def test_case_study_probabilities_match_a_manual_forward(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eksft_pipeline.analysis.case_study import render_case, token_prob_case_study
    from eksft_pipeline.models.tiny import make_tiny_assets

    paths = make_tiny_assets(tmp_path / "a", n_problems=60, n_eval_per_source=2, n_pretrain=10, pretrain=False,
                             progress=False, model_kwargs=dict(hidden_size=32, num_layers=1, num_heads=2,
                                                               num_kv_heads=1, intermediate_size=64))
    model = str(paths["model"])
    row = pd.read_parquet(paths["train"]).iloc[0]
    messages = [dict(m) for m in row["prompt"]] + [dict(m) for m in row["target"]]
    res = token_prob_case_study({"base": model, "again": model}, messages, tmp_path / "cs")
    tok = AutoTokenizer.from_pretrained(model)
    ids, start = render_case(tok, messages)
    assert tok.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([ids])).logits[0]
    manual = [torch.softmax(logits[t - 1], -1)[ids[t]].item() for t in range(start, len(ids))]
    assert res["probs"]["base"] == pytest.approx(manual, rel=1e-4, abs=1e-7)
    assert res["probs"]["again"] == res["probs"]["base"]
    assert len(res["tokens"]) == len(ids) - start
    html = (tmp_path / "cs" / "token_probs.html").read_text()
    assert html.count("class='tok'") == 2 * len(manual)
    assert (tmp_path / "cs" / "token_probs.png").read_bytes()[:4] == b"\x89PNG"
