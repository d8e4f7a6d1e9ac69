"""`make smoke` (issue 23 item 6): every stage with a handful of steps each, one verdict line per stage.

* The GPU recipe (model=qwen3-0.6b, the Makefile's default) is composed and dry-run through `make smoke DRY_RUN=1` on
  cluster=8gpu and cluster=2x8gpu: every stage is listed with its command, SFT and DAPO with their memory estimates,
  and the steps, samples and problems are the smoke profile's (recipes/profile/smoke.yaml), not the model's.
* On CPU, `make smoke MODEL=tiny` runs the same stages (the tiny assets of data/generated/tiny are built once and
  reused, as by tests/test_e2e_tiny.py): one `ok` line per stage and exit 0; a bad value injected into the split
  stage (more RL rows than the data has, caught only when the split runs) gives `failed` with the first error line,
  the stages after it `skipped`, and a nonzero exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.orchestrator import runner

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]
SMOKE_KEYS = ["assets", "split", "sft/eksft", "handoff/eksft", "rl/eksft", "eval/eksft", "report"]
VERDICT = re.compile(r"^\[verdict\] (\S+)\s+(ok|failed|skipped|killed)\s+(?:(\d+\.\d)s)?\s*(.*)$")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make_smoke(*args: str, timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    # -o: never (re)install into the venv running the tests (either stamp: a GPU install runs the CPU cluster too)
    cmd = ["make", "-s", "-o", f"{VENV}/.installed-cpu", "-o", f"{VENV}/.installed-gpu", "smoke", f"VENV={VENV}", *args]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "EKSFT_SKIP_GPU_CHECK": "1"})
    return proc, time.time() - t0


def _json_objects(text: str) -> list[dict]:
    dec, out, i = json.JSONDecoder(), [], 0
    while (j := text.find("\n{", i)) >= 0:
        obj, end = dec.raw_decode(text[j + 1:])
        out.append(obj)
        i = j + 1 + end
    return out


def _verdicts(stdout: str) -> list[tuple[str, str, str | None, str]]:
    return [m.groups() for ln in stdout.splitlines() if (m := VERDICT.match(ln)) and m.group(1) != "full"]


def test_smoke_profile_composes_the_smoke_not_the_model():
    """Composition only: the profile's values replace the model recipe's (tiny and qwen3-0.6b), its own run dir."""
    for model in ("tiny", "qwen3-0.6b"):
        cfg = compose_pipeline(f"model={model}", "stage=smoke", "profile=smoke")
        assert cfg.run_dir == f"runs/{model}-smoke" and cfg.verdicts is True
        assert list(cfg.stage.run) == ["assets", "split", "sft", "handoff", "rl", "eval", "report"]
        assert (cfg.split.n_sft, cfg.split.n_rl, cfg.rl.total_training_steps, cfg.rl.val_every) == (32, 64, 2, None)
        assert (cfg.eval.max_problems, cfg.eval.n_samples, list(cfg.eval.targets)) == (4, 2, ["sft", "rl"])
        assert cfg.model.sft.verl.trainer.total_epochs == 1 and cfg.model.sft.verl.data.train_batch_size == 16
    plain = compose_pipeline("model=qwen3-0.6b")
    assert plain.run_dir == "runs/qwen3-0.6b" and plain.verdicts is False and plain.eval.n_samples == 32
    assert plain.model.path == "Qwen/Qwen3-0.6B" and plain.model.chat_template == "chatml"
    assert plain.model.eos_token is None  # the tokenizer's <|im_end|>, as model=qwen3-8b


@pytest.mark.parametrize("cluster,nnodes", [("8gpu", 1), ("2x8gpu", 2)])
def test_make_smoke_dry_run_on_the_gpu_clusters(cluster, nnodes, tmp_path):
    """`make smoke DRY_RUN=1 [CLUSTER=2x8gpu]`: Qwen3-0.6B by default, every stage with its command and, for SFT and
    DAPO, a per-GPU memory estimate that fits; 2 SFT steps, 2 DAPO steps of 8 prompts x 4 vLLM rollouts, 4 problems x
    2 samples per benchmark (AIME25's 320 too)."""
    proc, wall = _make_smoke("DRY_RUN=1", f"CLUSTER={cluster}", f"RUN_DIR={tmp_path / 'run'}", timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    print(f"\n[smoke] make smoke DRY_RUN=1 CLUSTER={cluster}: {wall:.0f}s")
    head = proc.stdout.splitlines()[0]
    assert "stages assets -> split -> sft -> handoff -> rl -> eval -> report" in head, head
    assert f"model=qwen3-0.6b method=eksft cluster={cluster} (dry run)" in head, head
    stages = {o["stage"]: o for o in _json_objects(proc.stdout)}
    assert list(stages) == ["assets", "split", "sft", "handoff", "rl", "eval", "report"]
    assert stages["assets"]["model"] == "Qwen/Qwen3-0.6B"
    assert (stages["split"]["n_sft"], stages["split"]["n_rl"]) == (32, 64)

    sft = stages["sft"]
    v = sft["verl_config"]
    assert sft["command"] and v["model"]["override_config"]["attn_implementation"] == "flash_attention_2"
    assert v["engine"]["strategy"] == "fsdp2" and v["trainer"]["total_epochs"] == 1
    assert v["data"]["train_batch_size"] == 16 and 32 // v["data"]["train_batch_size"] == 2  # 2 SFT steps
    assert v["data"]["train_batch_size"] % (8 * nnodes) == 0
    me = sft["memory_estimate"]
    assert me["fits"] and 0 < me["peak_gib"] <= me["capacity_gib"], me

    rl = stages["rl"]
    v = rl["verl_config"]
    assert (v["trainer"]["total_training_steps"], v["trainer"]["nnodes"], v["trainer"]["n_gpus_per_node"]) == (
        2, nnodes, 8)
    rollout = v["actor_rollout_ref"]["rollout"]
    assert rollout["name"] == "vllm" and rollout["n"] == 4 and v["data"]["train_batch_size"] == 8
    assert (8 * 4) % (8 * nnodes) == 0 and v["algorithm"]["filter_groups"]["enable"] is False
    assert v["trainer"]["test_freq"] in (-1, None) or v["trainer"]["test_freq"] <= 0
    me = rl["memory_estimate"]
    assert me["fits"] and 0 < me["peak_gib"] <= me["capacity_gib"], me

    ev = stages["eval"]
    assert ev["backend"] == "vllm" and set(ev["targets"]) == {"sft", "rl"} and ev["sampling"]["n"] == 2
    assert ev["n_by_benchmark"] and set(ev["n_by_benchmark"].values()) == {2}, ev["n_by_benchmark"]
    assert ev["sampling"]["max_new_tokens"] == 1024


def test_a_failed_preflight_still_gives_one_line_per_stage(tmp_path, capsys, monkeypatch):
    """A failure before any stage (here: a GPU cluster on a machine without GPUs) is its own `preflight` line; every
    stage of the list is then `skipped`, and the orchestrator's exit code is nonzero."""
    monkeypatch.delenv("EKSFT_SKIP_GPU_CHECK", raising=False)
    monkeypatch.setattr(runner, "gpu_count", lambda: 0)
    cfg = compose_pipeline("stage=smoke", "profile=smoke", "model=qwen3-0.6b", "cluster=8gpu", f"run_dir={tmp_path}",
                           f"eval_data_dir={tmp_path}")
    rc = runner.main_from_config(cfg)
    lines = _verdicts(capsys.readouterr().out)
    assert rc == 2
    assert lines[0][:2] == ("preflight", "failed") and "needs CUDA GPUs" in lines[0][3], lines
    assert [(k, v) for k, v, _, _ in lines[1:]] == [(k, "skipped") for k in SMOKE_KEYS], lines


def test_first_error_line():
    """The verdict's error: the first non-empty line, the exception's type in front, KeyError unquoted, and for a
    stage run as a Ray task (cluster.launcher=ray) the stage's own exception, not Ray's traceback."""
    from ray.exceptions import RayTaskError

    from eksft_pipeline.contract.errors import ConfigError

    first = runner.Verdicts.first_error_line
    assert first(ValueError("\n  bad value x=1; fix it\n  detail\n")) == "ValueError: bad value x=1; fix it"
    assert first(KeyError("no key k")) == "KeyError: no key k" and first(RuntimeError()) == "RuntimeError"
    try:
        raise ConfigError("sft.verl.optim.lr=-1 must be > 0")
    except ConfigError as c:
        remote = RayTaskError("_run_stage_in_process", "Traceback (most recent call last):\n  ...", c)
    assert first(remote.as_instanceof_cause()) == "ConfigError: sft.verl.optim.lr=-1 must be > 0"
    assert first(KeyboardInterrupt()) == "stopped by SIGINT"


@pytest.mark.e2e
@pytest.mark.slow
def test_make_smoke_tiny_on_cpu(tmp_path):
    """`make smoke MODEL=tiny`: every stage ok, one line each, exit 0; then a bad value for the split stage: the split
    `failed` with its first error line, everything after it `skipped`, a nonzero exit."""
    run_dir = tmp_path / "run"
    proc, wall = _make_smoke("MODEL=tiny", f"RUN_DIR={run_dir}", timeout=1200)
    log = run_dir / "smoke.log"
    assert proc.returncode == 0, proc.stdout + proc.stderr + (log.read_text()[-3000:] if log.exists() else "")
    print(f"\n[smoke] make smoke MODEL=tiny: {wall:.0f}s\n{proc.stdout}")
    out = proc.stdout.splitlines()
    lines = _verdicts(proc.stdout)
    assert [(k, v) for k, v, _, _ in lines] == [(k, "ok") for k in SMOKE_KEYS], proc.stdout
    assert all(secs is not None for _, _, secs, _ in lines)
    # nothing else on the console but the summary and where the full log is
    assert out[-2].startswith(f"[verdict] all {len(SMOKE_KEYS)} stages ok") and out[-1] == f"[verdict] full output: {log}"
    assert len(out) == len(SMOKE_KEYS) + 2, out
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    s = {k: manifest[k]["summary"] for k in SMOKE_KEYS}
    assert all(manifest[k]["status"] == "complete" for k in SMOKE_KEYS)
    assert s["split"]["n_sft"] == 32 and s["split"]["n_rl"] == 64
    assert s["sft/eksft"]["steps"] == 2 and s["rl/eksft"]["steps"] == 2
    for target in ("sft", "rl"):
        m = json.loads((run_dir / "eval" / "eksft" / target / "metrics.json").read_text())["benchmarks"]
        assert {b: (x["n_problems"], x["n_samples"]) for b, x in m.items()} == {"tiny_add": (4, 2), "tiny_sub": (4, 2)}
    assert (run_dir / "report" / "report.md").is_file() and not (run_dir / "export").exists()

    broken = tmp_path / "broken"
    proc, wall = _make_smoke("MODEL=tiny", f"RUN_DIR={broken}", "ARGS=split.n_rl=100000", timeout=600)
    print(f"\n[smoke] make smoke MODEL=tiny with a broken split: {wall:.0f}s\n{proc.stdout}")
    assert proc.returncode != 0
    lines = _verdicts(proc.stdout)
    assert [(k, v) for k, v, _, _ in lines] == [("assets", "ok"), ("split", "failed"),
                                                *((k, "skipped") for k in SMOKE_KEYS[2:])], proc.stdout
    first = lines[1][3]
    assert first.startswith("DataError: n_sft=32 + n_rl=100000 exceeds the 2400 valid rows"), first
    assert all(note == "(not run: split failed)" for _, _, _, note in lines[2:])
    assert proc.stdout.splitlines()[-2].startswith("[verdict] split failed: 1 ok, 5 skipped")
