"""The orchestrator: manifest, skip of complete stages, clean re-run of failed / changed ones, dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.orchestrator.runner import run_pipeline

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets_dir(tmp_path_factory) -> Path:
    """Small CPU assets (no pretraining): enough for the split stage's tokenizer and data."""
    from eksft_pipeline.data.tiny_assets import make_tiny_assets

    out = tmp_path_factory.mktemp("assets")
    make_tiny_assets(out, n_problems=200, n_eval_per_source=4, n_pretrain=20, pretrain=False, progress=False)
    return out


def _split_cfg(assets_dir: Path, run_dir: Path, *extra: str):
    return compose_pipeline(
        "stage=split", f"run_dir={run_dir}", f"model.assets_dir={assets_dir}", "model.data.n_sft=50", *extra
    )


def test_complete_stage_is_skipped_and_changes_rerun_it(assets_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = run_pipeline(_split_cfg(assets_dir, run_dir))
    assert first[0]["status"] == "complete"
    m = Manifest(run_dir).entry("split")
    assert m["status"] == "complete" and m["attempts"] == 1
    assert m["outputs"]["sft_train"]["path"] == "split/sft_train.parquet"  # relative to the run dir
    sft = Path(Manifest(run_dir).outputs("split")["sft_train"])
    assert sft == run_dir / "split" / "sft_train.parquet" and sft.is_file() and m["outputs"]["sft_train"]["hash"]
    assert m["summary"]["n_sft"] == 50 and m["inputs"]["source"]["hash"]

    # same config, same inputs, outputs intact -> skipped
    assert run_pipeline(_split_cfg(assets_dir, run_dir))[0]["status"] == "skipped"
    # an output edited on disk -> re-run, and it is rewritten
    sft.write_bytes(b"corrupt")
    assert run_pipeline(_split_cfg(assets_dir, run_dir))[0]["status"] == "complete"
    assert sft.read_bytes()[:4] == b"PAR1"
    # a changed config -> re-run
    again = run_pipeline(_split_cfg(assets_dir, run_dir, "model.data.n_sft=60"))
    assert again[0]["status"] == "complete" and again[0]["summary"]["n_sft"] == 60
    assert Manifest(run_dir).entry("split")["attempts"] == 3
    # force=true re-runs a complete stage
    assert run_pipeline(_split_cfg(assets_dir, run_dir, "model.data.n_sft=60", "force=true"))[0]["status"] == "complete"


def test_failed_stage_is_recorded_and_rerun_cleanly(assets_dir, tmp_path):
    import pandas as pd

    run_dir = tmp_path / "run"
    # a missing source is a config error: rejected before the manifest or any folder is written
    bad = _split_cfg(assets_dir, run_dir, f"model.data.source={tmp_path / 'missing.parquet'}")
    with pytest.raises(ValueError, match="split.source=.*missing.parquet does not exist"):
        run_pipeline(bad)
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "split").exists()
    # a source that exists but lacks a required column fails while running: recorded as failed
    broken = tmp_path / "broken.parquet"
    pd.read_parquet(assets_dir / "data" / "tiny_math_train.parquet").drop(columns=["target"]).to_parquet(broken)
    with pytest.raises(ValueError, match="missing required column 'target'"):
        run_pipeline(_split_cfg(assets_dir, run_dir, f"model.data.source={broken}"))
    e = Manifest(run_dir).entry("split")
    assert e["status"] == "failed" and "missing required column" in e["error"]
    # leftovers of the failed attempt are removed before the next attempt
    stray = run_dir / "split" / "half-written.tmp"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text("x")
    assert run_pipeline(_split_cfg(assets_dir, run_dir))[0]["status"] == "complete"
    assert not stray.exists()
    assert Manifest(run_dir).entry("split")["status"] == "complete"


def test_later_stage_without_upstream_says_which(assets_dir, tmp_path):
    cfg = compose_pipeline("stage=handoff", f"run_dir={tmp_path / 'run'}", f"model.assets_dir={assets_dir}")
    with pytest.raises(FileNotFoundError, match="sft/eksft.*never run.*run it first"):
        run_pipeline(cfg)


def _dry_run(*overrides: str, run_dir: Path) -> str:
    cmd = [sys.executable, "-m", "eksft_pipeline", "dry_run=true", f"run_dir={run_dir}", *overrides]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _json_blocks(out: str) -> list[dict]:
    """The pretty-printed JSON objects of a dry run, one per stage."""
    blocks, cur = [], None
    for line in out.splitlines():
        if line == "{":
            cur = [line]
        elif cur is not None:
            cur.append(line)
            if line == "}":
                blocks.append(json.loads("\n".join(cur)))
                cur = None
    return blocks


def test_dry_run_qwen3_8b_prints_every_stage_without_a_gpu(tmp_path):
    run_dir = tmp_path / "run"
    out = _dry_run("model=qwen3-8b", "cluster=8gpu", run_dir=run_dir)
    stages = {b["stage"]: b for b in _json_blocks(out)}
    assert list(stages) == ["assets", "split", "sft", "handoff", "rl", "eval", "report", "export"]
    sft = stages["sft"]
    assert "eksft_pipeline.verl_ext.sft_ray" in sft["command"] and "torch.distributed.run" not in sft["command"]
    assert sft["ray_job"]["world_size"] == 8 and sft["ray_job"]["ray"].startswith("local")
    assert sft["verl_config"]["model"]["path"] == "Qwen/Qwen3-8B"  # the paper's released model (issue 11)
    assert "sft: estimated peak" in out and "rl: estimated peak" in out and sft["memory_estimate"]["fits"]
    assert sft["verl_config"]["optim"]["lr"] == 1e-5 and sft["verl_config"]["eksft"]["loss"] == "eksft"
    rl = stages["rl"]
    assert "eksft_pipeline.verl_ext.ppo_main" in rl["command"]
    assert rl["verl_config"]["actor_rollout_ref"]["rollout"]["name"] == "vllm"
    assert rl["verl_config"]["trainer"]["n_gpus_per_node"] == 8
    assert stages["eval"]["backend"] == "vllm" and stages["eval"]["sampling"]["n"] == 32
    assert stages["split"]["n_sft"] == 3000 and stages["split"]["source"] == "Elliott/Openr1-Math-46k-8192"
    # nothing was run or recorded
    assert not (run_dir / "manifest.json").exists()


def test_rerun_ends_survivors_of_an_earlier_attempt_and_refuses_a_live_one(assets_dir, tmp_path, capsys):
    """A process of an earlier attempt of this stage in this run dir (its watchdog was killed too) is ended
    before the re-run starts; an attempt whose orchestrator is still alive is not run twice."""
    import os
    import time

    from eksft_pipeline.contract import procs
    from eksft_pipeline.contract.stage_api import PipelineError

    run_dir = (tmp_path / "run").resolve()
    env = {**os.environ, procs.ENV_RUN_DIR: str(run_dir), procs.ENV_STAGE: "split", procs.ENV_TOKEN: "an-old-run"}
    survivor = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.2)"], env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not procs.find({procs.ENV_TOKEN: "an-old-run"}) and time.monotonic() < deadline:
            time.sleep(0.05)
        # the manifest says an orchestrator that is alive (this very survivor, for the test) runs the stage
        m = Manifest(run_dir)
        m.start("split", {}, "h", {})
        m.update("split", pid=survivor.pid, pid_start=procs.start_time(survivor.pid))
        with pytest.raises(PipelineError, match=f"already running in process {survivor.pid}"):
            run_pipeline(_split_cfg(assets_dir, run_dir))
        assert survivor.poll() is None
        # a recycled pid (another start time) is not that orchestrator: the survivor is ended, the stage runs
        m.update("split", pid_start=procs.start_time(survivor.pid) + 1)
        assert run_pipeline(_split_cfg(assets_dir, run_dir))[0]["status"] == "complete"
        assert survivor.wait(timeout=15) is not None
        assert "ending 1 process(es) left over by an earlier attempt" in capsys.readouterr().out
    finally:
        survivor.kill()
        survivor.wait()
