"""task=tool_use: which stages run (recipes/task/), and the Tables 10-11 report from hand-made eval results."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.contract.stage_api import ConfigError
from eksft_pipeline.orchestrator.runner import ORDER, TASK_STAGES, load_stage, stage_list


def test_task_selects_stages_and_run_dir():
    math = compose_pipeline()
    assert stage_list(math) == ORDER and str(math.task.name) == "math" and str(math.run_dir) == "runs/tiny"
    tool = compose_pipeline("task=tool_use")
    assert stage_list(tool) == ["assets", "tool_split", "sft", "tool_eval", "tool_report"]
    assert str(tool.run_dir) == "runs/tiny-tool_use"
    assert stage_list(compose_pipeline("task=tool_use", "stage=train_eval")) == ["assets", "tool_split", "sft",
                                                                                 "tool_eval"]  # fmt: skip
    assert stage_list(compose_pipeline("task=tool_use", "stage=rl")) == []  # no RL in this task
    # the task stages keep the keys of the stages they replace: the SFT stage reads `split`, the report `eval/*`
    assert load_stage("tool_split").name == "split" and load_stage("tool_report").name == "report"
    assert load_stage("tool_eval").key(tool) == load_stage("eval").key(tool)
    # the tiny model evaluates its twin; a GPU model the installed BFCL data, with ACEBench passed by the user
    assert str(tool.task.data.source) == "tiny" and str(tool.task.eval.source) == "tiny"
    q = compose_pipeline("task=tool_use", "model=qwen3-8b", "cluster=8gpu")
    assert q.task.data.source is None and str(q.task.eval.source) == "bfcl"
    assert list(q.task.eval.categories) == ["live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
                                            "irrelevance", "live_irrelevance"]  # fmt: skip
    bad = compose_pipeline("task=tool_use", "task.stage_map.eval=nope")
    with pytest.raises(ConfigError, match=r"task.stage_map names unknown stage\(s\) \['nope'\]"):
        stage_list(bad)
    assert set(TASK_STAGES) == {"tool_split", "tool_eval", "tool_report"}


def _write_eval(d, target, method, rows, model="m"):
    from eksft_pipeline.eval.bfcl import summarize

    tdir = d / target
    tdir.mkdir(parents=True)
    df = pd.DataFrame(rows)
    df.to_parquet(tdir / "samples.parquet", index=False)
    met = {"task": "tool_use", "target": target, "model_name": model, "method": method, "init": method,
           "finish_length_rate": 0.0,
           "bfcl": summarize(df.rename(columns={"benchmark": "category"}).to_dict("records"), n_boot=200)}
    (tdir / "metrics.json").write_text(json.dumps(met))
    return str(tdir / "metrics.json")


def test_report_tables_and_paired_moves(tmp_path):
    from eksft_pipeline.analysis.tool_use_report import gather_tool_evals, paired_moves, tables

    def rows(live, irr):
        return ([{"benchmark": "live_simple", "id": f"s{i}", "correct": c, "status": "ok"} for i, c in enumerate(live)]
                + [{"benchmark": "irrelevance", "id": f"i{i}", "correct": c, "status": "no_call"}
                   for i, c in enumerate(irr)])  # fmt: skip

    stages = {}
    for method, live in (("sft", [1] * 18 + [0] * 2), ("dft", [1] * 4 + [0] * 16)):
        d = tmp_path / "eval" / method
        base = _write_eval(d, "base", method, rows([0] * 20, [1] * 10))
        sft = _write_eval(d, "sft", method, rows(live, [1] * 5 + [0] * 5))
        stages[f"eval/{method}"] = {"status": "complete", "outputs": {"base_metrics": {"path": base},
                                                                      "sft_metrics": {"path": sft}}}
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 2, "stages": stages}))
    evals = gather_tool_evals([tmp_path])
    assert [(r["model_name"], r["method"]) for r in evals] == [("m", "base"), ("m", "dft"), ("m", "sft")]
    t = tables(evals)
    assert t["table10"]["BFCL live"].iloc[0].startswith("0.0 [0.0, 0.0]")
    assert t["table10"]["BFCL live"].iloc[2].startswith("90.0 [")
    assert t["table11"]["Irrelevance"].iloc[1].startswith("50.0 [")
    assert list(t["rates"]["no call %"]) == [33.33] * 3  # 10 irrelevance rows of 30 have status no_call
    moved = paired_moves(evals, n_boot=500).set_index("Method")
    assert moved.loc["sft", "BFCL live"].startswith("+90.0") and moved.loc["sft", "BFCL live ci_low"] > 0
    assert moved.loc["dft", "BFCL live"].startswith("+20.0")
    assert moved.loc["sft", "Irrelevance mean"].startswith("-50.0") and moved.loc["sft", "Irrelevance mean ci_high"] < 0


def test_stage_checks_name_the_setting(tmp_path):
    from eksft_pipeline.contract.manifest import Manifest
    from eksft_pipeline.contract.stage_api import StageContext

    def ctx(*over, dry=False):
        cfg = compose_pipeline("task=tool_use", *over)
        return StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key="x", dry_run=dry)

    split, ev = load_stage("tool_split"), load_stage("tool_eval")
    with pytest.raises(ConfigError, match="task.data.source is empty"):
        split.check(ctx("model=qwen3-8b", "cluster=8gpu"))
    split.check(ctx("model=qwen3-8b", "cluster=8gpu", dry=True))  # a dry run shows the stages without it
    with pytest.raises(ConfigError, match=r"task.data.source=/nowhere does not exist"):
        split.check(ctx("task.data.source=/nowhere"))
    with pytest.raises(ConfigError, match=r"task.data.langs=\['fr'\]"):
        split.check(ctx("task.data.langs=[fr]"))
    with pytest.raises(ConfigError, match=r"task.eval.categories=\['simple'\]"):
        ev.check(ctx("task.eval.categories=[simple]"))
    with pytest.raises(ConfigError, match=r"task.eval.targets=\['rl'\]"):
        ev.check(ctx("task.eval.targets=[rl]"))
    with pytest.raises(ConfigError, match="one completion per entry"):
        ev.check(ctx("task.eval.n_samples=4"))
