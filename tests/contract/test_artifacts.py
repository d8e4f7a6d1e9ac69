"""Shared stage machinery: the logged subprocess (quiet console, readable log, whole tree ended on an
exception), atomic writes, verl checkpoint checks before a resume, and the HF export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from eksft_pipeline.contract import procs
from eksft_pipeline.contract.artifacts import (
    StepProgress,
    atomic_path,
    atomic_write_json,
    check_resume_point,
    check_safetensors,
    read_metric_logs,
    tee,
)
from eksft_pipeline.contract.stage_api import PipelineError

# lines as verl 0.9.1 prints them (SFT trainer; main_ppo through Ray, with its prefix and colours)
SFT_LINES = [
    "Total steps: 4, num_warmup_steps: 0",
    "Epoch 1/1:   0%|          | 0/4 [00:00<?, ?it/s]step:1 - perf/max_memory_allocated_gb:0.0 - train/loss:5.875 - train/lr:0.0005",
    "step:2 - train/loss:5.5 - train/lr:0.001 - eksft/mask_frac:0.37",
    "Saving checkpoint to: /r/sft/eksft/checkpoints/global_step_2",
]
RL_LINE = ("\x1b[36m(TaskRunnerV1 pid=12415)\x1b[0m step:3 - global_seqlen/min:4506.0 - critic/score/mean:-1.62890625 - "
           "response_length/mean:102.5625 - training/global_step:3 - num_turns/min:np.int32(2)")


def test_step_progress_shows_step_metrics_and_eta(monkeypatch):
    clock = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    p = StepProgress("sft/eksft", {"loss": "train/loss", "mask": "eksft/mask_frac"})
    out = [p(x) for x in SFT_LINES]
    assert out[0] is None and p.total == 4
    assert out[1] == "[sft/eksft] step 1/4  loss 5.875"
    assert out[2] == "[sft/eksft] step 2/4  loss 5.5  mask 0.37  10.0 s/step  ETA 20s"
    assert out[3] == "[sft/eksft] checkpoint global_step_2"
    # without verl's "Total steps" line, the total is the per-epoch bar's steps times the epochs (6 x 17)
    ep = StepProgress("sft/sft", {})
    assert ep("Epoch 1/6:   0%|          | 0/17 [00:00<?, ?it/s]") is None and ep.total == 102
    rl = StepProgress("rl/eksft", {"score": "critic/score/mean", "len": "response_length/mean"}, total=8)
    import re

    assert rl(re.sub(r"\x1b\[[0-9;]*m", "", RL_LINE)) == "[rl/eksft] step 3/8  score -1.629  len 102.6"


def test_tee_keeps_everything_in_the_log_and_shows_only_progress(tmp_path, capsys):
    script = (
        "import sys, time\n"
        "print('x' * 50 + ' verl config dump line', flush=True)\n"
        "for i in range(3):\n"
        "    sys.stdout.write(f'\\rEpoch 1/1: {i}/3 bar'); sys.stdout.flush()\n"
        "print()\n"
        "print('step:1 - train/loss:2.5', flush=True)\n"
    )
    log = tmp_path / "logs" / "train.log"
    rc = tee([sys.executable, "-c", script], dict(os.environ), log, progress=StepProgress("sft/x", {"loss": "train/loss"}))
    assert rc == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown == ["[sft/x] step 1  loss 2.5"]
    text = log.read_text()
    assert "verl config dump line" in text and "step:1 - train/loss:2.5" in text
    # every progress-bar redraw is its own line, not one giant line
    assert [ln for ln in text.splitlines() if ln.startswith("Epoch")] == [f"Epoch 1/1: {i}/3 bar" for i in range(3)]


def test_tee_ends_the_whole_tree_when_interrupted(tmp_path):
    """An exception in the orchestrator (Ctrl-C, SIGTERM) while verl runs: every process of the stage is ended,
    also one in a session of its own (like a Ray worker)."""
    mark, token = uuid.uuid4().hex, uuid.uuid4().hex
    env = {**os.environ, "EKSFT_TEST_MARK": mark, procs.ENV_TOKEN: token, procs.ENV_STAGE: "rl/x"}
    child = ("import subprocess, sys, time\n"
             "subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.2)'], start_new_session=True)\n"
             "print('step:1 - x:1', flush=True)\n"
             "while True: time.sleep(0.2)\n")

    def progress(line):
        if line.startswith("step:1"):
            time.sleep(0.5)  # let the grandchild start
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tee([sys.executable, "-c", child], env, tmp_path / "log", progress=progress)
    deadline = time.monotonic() + 10
    while procs.find({"EKSFT_TEST_MARK": mark}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert procs.find({"EKSFT_TEST_MARK": mark}) == []


def test_atomic_path_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"half":')
            raise RuntimeError("killed mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]


def test_metrics_lines_cut_short_by_a_kill_are_skipped(tmp_path):
    (tmp_path / "metrics-1.jsonl").write_text('{"step": 1, "data": {"loss": 2.0}}\n{"step": 2, "data": {"lo')
    (tmp_path / "metrics-2.jsonl").write_text('{"step": 2, "data": {"loss": 1.5}}\n')
    steps, bad = read_metric_logs(tmp_path)
    assert steps == {1: {"loss": 2.0}, 2: {"loss": 1.5}} and bad == 1


def test_resume_point_is_checked_before_verl_trusts_it(tmp_path):
    ck = tmp_path / "checkpoints"
    for n in (2, 4, 6):
        (ck / f"global_step_{n}").mkdir(parents=True)
    (ck / "latest_checkpointed_iteration.txt").write_text("4")
    note = check_resume_point(ck)  # step 6 was being written when the run was killed
    assert "half-written" in note and sorted(p.name for p in ck.iterdir()) == [
        "global_step_2", "global_step_4", "latest_checkpointed_iteration.txt"]  # fmt: skip
    assert check_resume_point(ck) is None
    (ck / "latest_checkpointed_iteration.txt").write_text("")  # the tracker itself was cut short
    assert "starting afresh" in check_resume_point(ck) and not ck.exists()


def test_truncated_safetensors_is_detected(tmp_path):
    import torch
    from safetensors.torch import save_file

    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(f))
    check_safetensors(f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="truncated"):
        check_safetensors(f)
    f.write_bytes(data[:5])
    with pytest.raises(PipelineError, match="not a complete safetensors file"):
        check_safetensors(f)


def test_stage_subprocess_with_a_token_stays_in_the_orchestrators_process_group(tmp_path):
    token = uuid.uuid4().hex
    env = {**os.environ, procs.ENV_TOKEN: token}
    rc = tee([sys.executable, "-c", "import os; print(os.getpgid(0))"], env, tmp_path / "log")
    assert rc == 0 and int((tmp_path / "log").read_text().split()[-1]) == os.getpgid(0)
    rc = tee([sys.executable, "-c", "import os; print(os.getpgid(0))"], dict(os.environ), tmp_path / "log2")
    assert int((tmp_path / "log2").read_text().split()[-1]) != os.getpgid(0)  # untracked: its own session


def test_subprocess_helper_is_importable_as_the_watchdog():
    from eksft_pipeline.orchestrator import watchdog

    res = subprocess.run([sys.executable, "-m", "eksft_pipeline.orchestrator.watchdog"], capture_output=True, text=True)
    assert res.returncode != 0 and "started by the orchestrator" in res.stderr
    assert Path(watchdog.__file__).name == "watchdog.py"
