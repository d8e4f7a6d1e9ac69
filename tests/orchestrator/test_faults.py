"""Fault injection on real runs: the trials of issue 12, on `cp -r` copies of the shared tiny end-to-end run
(`tiny_run`, tests/conftest.py), through the command line exactly as a user types it.

Trials: kill -9 of the orchestrator's process group at a random point of each stage, then a re-run; SIGTERM
mid-SFT; a changed config; invalid values on a completed run; truncated outputs (exported model, eval part,
manifest temporary); a small full file system (a real tmpfs when this machine lets root mount one); a copied
run directory. Invariants checked after each:

* no stale result is ever reported: every `complete` manifest entry's outputs have their recorded hashes and
  its inputs are still the files it was computed from (`assert_truthful`); a report never shows results of
  an entry that is not complete;
* nothing valid is deleted before validation (tree hashes before/after a rejected command);
* no process outlives its run: a few seconds after the orchestrator ends (or is killed), no process carries
  the test's own environment marker or mentions the run directory on its command line;
* every error is one line that names the fix: the last console line is `[eksft-pipeline] error: ...`, no
  Python traceback.

The random kill points come from `EKSFT_FAULT_SEED` (default 12); each trial prints its seed and delay.
Slow (verl, Ray); the per-stage kill matrix beyond SFT and RL is marked `long`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from eksft_pipeline.contract import procs
from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.verl_ext.verl_stage import hydra_quote

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")]
REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("EKSFT_FAULT_SEED", "12"))
# small RL settings for trials that start RL afresh (the shared run's own RL: 4 steps of 8 prompts x 4)
RL_SMALL = ("rl.total_training_steps=2", "+rl.verl.data.train_batch_size=4", "+rl.verl.actor_rollout_ref.rollout.n=2",
            "+rl.verl.actor_rollout_ref.actor.ppo_mini_batch_size=4", "rl.val_every=null")  # no benchmark curves
SFT_SMALL = ("+model.sft.verl.trainer.total_training_steps=4", "sft.verl.trainer.save_freq=1")


# -- helpers -------------------------------------------------------------------------------------------
def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def tree(d: Path, *, manifest: bool = True) -> dict[str, str]:
    """Every file's content hash (Hydra's per-invocation `.hydra/` folder and the hash cache excluded; the manifest
    too with `manifest=False`)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and ".hydra" not in p.relative_to(d).parts and p.name != ".hash_cache.json"
            and (manifest or not p.name.startswith("manifest.json"))}


class Orchestrator:
    """`python -m eksft_pipeline ...` in a session of its own (as a terminal or a scheduler starts a job),
    carrying an environment marker that every descendant inherits (Ray's workers included)."""

    def __init__(self, run_dir: Path, *args: str, log: Path):
        self.run_dir, self.log, self.mark = run_dir, log, uuid.uuid4().hex
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eksft_pipeline", f"run_dir={hydra_quote(str(run_dir))}", *args], cwd=REPO,
            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "EKSFT_TEST_MARK": self.mark, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 600) -> bool:
        """True once `pattern` is in the output; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text(), flags=re.M):
                return True
            if self.proc.poll() is not None:
                return bool(re.search(pattern, self.text(), flags=re.M))
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text()[-3000:]}")

    def kill9_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def survivors(self) -> list[int]:
        marked = set(procs.find({"EKSFT_TEST_MARK": self.mark}))
        run = str(self.run_dir)
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid() and run in procs.cmdline(int(name)) and procs.alive(int(name)):
                marked.add(int(name))
        return sorted(marked)

    def assert_no_survivors(self, within_s: float = 8.0) -> None:
        deadline = time.monotonic() + within_s
        left = self.survivors()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = self.survivors()
        for pid in left:  # do not leave them to the next test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes outlived the run by {within_s}s: {procs.describe(left, 8)}"


def run_cli(run_dir: Path, *args: str, log: Path, timeout: float = 1500) -> tuple[int, str]:
    o = Orchestrator(run_dir, *args, log=log)
    try:
        rc = o.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        o.kill9_group()
        raise
    o.assert_no_survivors()
    return rc, o.text()


def run_here(run_dir: Path, *args: str, capsys) -> tuple[int, str]:
    """The same as the command line, in this process (no interpreter start-up: cheaper for trials that are not
    about processes): compose, run, and print errors exactly as `python -m eksft_pipeline` does."""
    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.orchestrator.runner import main_from_config

    capsys.readouterr()
    rc = main_from_config(compose_pipeline(f"run_dir={hydra_quote(str(run_dir))}", *args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def assert_one_line_error(text: str, *needles: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    assert "Traceback (most recent call last)" not in text, text[-4000:]
    assert lines and lines[-1].startswith("[eksft-pipeline] error: "), text[-3000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def assert_truthful(run_dir: Path) -> None:
    """Every `complete` entry: its outputs have the recorded hashes, its inputs are the files it was made from."""
    m = Manifest(run_dir)
    for key, e in m.read()["stages"].items():
        if e.get("status") != "complete":
            continue
        for name, o in (e.get("outputs") or {}).items():
            path = m.resolve(o["path"])
            assert Path(path).exists(), (key, name, path)
            assert m._matches(path, o["hash"]), f"{key}: output {name} ({path}) differs from its recorded hash"
        for name, i in (e.get("inputs") or {}).items():
            if i.get("hash") is None:
                continue
            path = m.resolve(i["path"])
            assert m._matches(path, i["hash"]), f"{key} is complete but its input {name} ({path}) has changed"


def trial_rng(name: str) -> random.Random:
    return random.Random(f"{SEED}:{name}")


# -- kill -9 at a random point of each stage, then re-run ---------------------------------------------
KILL_TRIALS = {
    # stage key: (overrides that make the stage run in a copy of the complete run, kill window after it starts)
    # assets: into a folder of the trial's own (the shared data/generated/tiny must not be rebuilt)
    "assets": (("stage=assets", "model.assets_dir={tmp}/assets", "model.assets.pretrain=false",
                "model.assets.n_problems=300"), (0.0, 8.0)),
    "split": (("stage=split", "force=true"), (0.0, 4.0)),
    "sft/eksft": (("stage=sft", *SFT_SMALL), (2.0, 40.0)),
    "handoff/eksft": (("stage=handoff", "force=true"), (0.0, 6.0)),
    "rl/eksft": (("stage=rl", *RL_SMALL), (5.0, 90.0)),
    "eval/eksft": (("stage=eval", "eval.n_samples=2", "eval.max_problems=2"), (0.5, 15.0)),
    "report": (("stage=report", "force=true"), (0.5, 12.0)),
}
FAST_KILLS = {"rl/eksft"}  # in `make test`; the others run with `make test-long`


@pytest.mark.parametrize("key", [pytest.param(k, marks=() if k in FAST_KILLS else pytest.mark.long)
                                 for k in KILL_TRIALS])
def test_kill9_at_a_random_point_then_rerun(complete_tiny_run, tmp_path, key):
    args, (lo, hi) = KILL_TRIALS[key]
    args = tuple(a.replace("{tmp}", str(tmp_path)) for a in args)
    delay = trial_rng(key).uniform(lo, hi)
    print(f"\n[faults] {key}: kill -9 of the process group {delay:.2f}s after the stage starts (seed {SEED})")
    run = copy_run(complete_tiny_run.run_dir, tmp_path / "run")
    o = Orchestrator(run, *args, log=tmp_path / "killed.log")
    started = o.wait_for(rf"\] {re.escape(key)}: (re-)?running")
    assert started, o.text()[-3000:]
    time.sleep(delay)
    finished_first = o.proc.poll() is not None
    o.kill9_group()
    o.assert_no_survivors()
    entry = Manifest(run).entry(key)
    if finished_first:
        print(f"[faults] {key}: the stage finished before the kill ({delay:.2f}s)")
    elif entry["status"] != "complete":  # else: killed before the attempt was recorded, the old result stands
        # never claimed complete; the watchdog (gone by now: it carries the marker too) recorded the kill
        assert entry["status"] == "killed", entry["status"]
        assert "orchestrator died" in entry["error"]
    assert_truthful(run)

    rc, text = run_cli(run, *[a for a in args if a != "force=true"], log=tmp_path / "rerun.log")
    assert rc == 0, text[-4000:]
    assert Manifest(run).entry(key)["status"] == "complete"
    assert re.search(rf"\] {re.escape(key)}: (complete in|complete, skipped)", text), text[-2000:]
    assert_truthful(run)


# -- SIGTERM and a changed config on SFT -----------------------------------------------------------------
def test_changed_sft_config_retrains_and_sigterm_stops_everything(complete_tiny_run, tmp_path):
    """`sft.verl.optim.lr=...` on a complete run: the new value is used (not the model recipe's), the old final
    checkpoint is NOT resumed (the bug: an 18 s "retrain" that reproduced the old weights byte for byte), downstream
    results are marked stale and never reported. A SIGTERM mid-run stops every process and says 'killed'; the
    re-run with the same config resumes from its own checkpoints."""
    from safetensors.torch import load_file

    run = copy_run(complete_tiny_run.run_dir, tmp_path / "run")
    sft = run / "sft" / "eksft"
    old_w = load_file(str(sft / "hf_model" / "model.safetensors"))
    old_steps = sorted(p.name for p in (sft / "checkpoints").glob("global_step_*"))
    args = ("stage=sft", "sft.verl.optim.lr=5e-4", *SFT_SMALL)

    o = Orchestrator(run, *args, log=tmp_path / "term.log")
    assert o.wait_for(r"\[sft/eksft\] step 2/", timeout=900), o.text()[-3000:]
    time.sleep(trial_rng("sigterm").uniform(0.0, 2.0))
    os.kill(o.proc.pid, signal.SIGTERM)  # the orchestrator only, as `kill <pid>` or a scheduler's first signal
    rc = o.proc.wait(timeout=120)
    text = o.text()
    o.assert_no_survivors()
    if rc == 0:
        pytest.skip("the 4-step SFT finished before SIGTERM arrived (machine very fast); nothing to check")
    assert rc == 128 + signal.SIGTERM, (rc, text[-3000:])
    assert_one_line_error(text, "stopped by SIGTERM", "re-run the same command to resume")
    entry = Manifest(run).entry("sft/eksft")
    assert entry["status"] == "killed"
    assert entry["config"]["sft"]["verl"]["optim"]["lr"] == 5e-4
    kept = sorted(p.name for p in (sft / "checkpoints").glob("global_step_*"))
    assert kept and not set(kept) & set(old_steps), (old_steps, kept)  # the old config's checkpoints are gone
    stages = Manifest(run).read()["stages"]
    assert {k for k, e in stages.items() if e["status"] == "stale"} >= {"rl/eksft", "eval/eksft", "report"}

    rc, text = run_cli(run, *args, log=tmp_path / "rerun.log")
    assert rc == 0, text[-4000:]
    assert "same config: keeping ['checkpoints', 'logs']" in text
    new_w = load_file(str(sft / "hf_model" / "model.safetensors"))
    assert any(not (new_w[k] == old_w[k]).all() for k in old_w), "SFT 'completed' without changing the weights"
    vc = (sft / "verl_sft.yaml").read_text()
    assert re.search(r"^\s+lr: 0\.0005$", vc, flags=re.M), "the command-line lr must win over the model recipe"
    metrics = json.loads((sft / "metrics.json").read_text())
    assert sorted(map(int, metrics)) == list(range(1, 5)), sorted(metrics)  # 4 fresh steps, none of the old 36
    assert_truthful(run)

    # the report must not show the old RL / eval numbers, made from the old SFT model
    rc, text = run_cli(run, "stage=report", log=tmp_path / "report.log")
    assert rc == 0, text[-3000:]
    md = (run / "report" / "report.md").read_text()
    assert "eksft (SFT→RL)" not in md and "No completed eval stage" in md
    assert "| rl/eksft | stale |" in md


# -- invalid values on a completed run ---------------------------------------------------------------------
INVALID = [
    (("stage=sft", "method.params.rho=-0.5"), "rho"),
    (("stage=split", "split.think_prefix=bogus"), "split.think_prefix='bogus' must be one of"),
    (("stage=rl", "+rl.verl.algorithm.adv_estimator=nosuch"), "adv_estimator"),
    (("stage=eval", "eval.top_p=1.5"), "eval.top_p=1.5 must be in (0, 1]"),
    (("stage=all", "eval.n_samples=0"), "eval.n_samples=0 must be > 0"),
    (("stage=rl", "init=nosuch"), "neither a method"),
    # verl values, type- and range-checked before anything is cleaned (issue 24)
    (("stage=sft", "sft.verl.optim.lr=abc"), "sft.verl.optim.lr='abc' is not a float"),
    (("stage=sft", "sft.verl.optim.lr=-1"), "sft.verl.optim.lr=-1 must be > 0"),
    (("stage=rl", "+rl.verl.actor_rollout_ref.actor.optim.lr=abc"), "rl.verl.actor_rollout_ref.actor.optim.lr='abc'"),
    (("stage=rl", "+rl.verl.actor_rollout_ref.rollout.n=0"), "rl.verl.actor_rollout_ref.rollout.n=0 must be > 0"),
]


def test_invalid_values_on_a_completed_run_delete_nothing(complete_tiny_run, tmp_path, capsys):
    run = copy_run(complete_tiny_run.run_dir, tmp_path / "run")
    before = tree(run)
    for i, (args, needle) in enumerate(INVALID):
        if i == 0:  # the first through the real command line, the rest in this process (same code path)
            rc, text = run_cli(run, *args, log=tmp_path / f"invalid-{i}.log", timeout=600)
        else:
            rc, text = run_here(run, *args, capsys=capsys)
        assert rc == 2, (args, text[-3000:])
        assert_one_line_error(text, needle)
        after = tree(run)
        assert after == before, (args, sorted(set(before) ^ set(after)) or "contents changed")
    assert all(e["status"] == "complete" for e in Manifest(run).read()["stages"].values())


# -- truncated outputs --------------------------------------------------------------------------------------
def test_truncated_outputs_are_detected_and_redone(complete_tiny_run, tmp_path, capsys):
    run = copy_run(complete_tiny_run.run_dir, tmp_path / "run")
    weights = run / "sft" / "eksft" / "hf_model" / "model.safetensors"
    good = weights.read_bytes()
    samples = run / "eval" / "eksft" / "sft" / "samples.parquet"
    good_samples = samples.read_bytes()
    part = sorted((run / "eval" / "eksft" / "sft" / "samples").glob("part-*.parquet"))[3]
    with open(weights, "r+b") as f:  # cut short in place
        f.truncate(len(good) // 3)
    part.write_bytes(part.read_bytes()[:100])
    (run / "manifest.json.tmp").write_text('{"version": 2, "stages": {"sp')  # a killed writer's leftover

    rc, text = run_here(run, "stage=sft", capsys=capsys)
    assert rc == 0, text[-3000:]
    assert "output 'hf_model' changed on disk" in text and "same config: keeping" in text
    assert "training under this config already finished at step" in text  # verl is not relaunched
    assert weights.read_bytes() == good  # re-exported from the intact final checkpoint, not retrained
    assert not (run / "manifest.json.tmp").exists()
    # the same bytes again: what was made from them is current again, nothing downstream re-runs
    assert re.search(r"current again: .*rl/eksft", text), text[-2000:]
    assert Manifest(run).entry("eval/eksft")["status"] == "complete"

    # eval re-runs under another (non-sampling) setting: the saved samples are reused, the damaged part redone
    rc, text = run_here(run, "stage=eval", "eval.bootstrap=500", capsys=capsys)
    assert rc == 0, text[-3000:]
    assert f"{part.name} is unreadable" in text and "sft: sampling 1 problems" in text
    assert samples.read_bytes() == good_samples or _same_parquet(samples, good_samples)
    assert_truthful(run)


def _same_parquet(path: Path, data: bytes) -> bool:
    import io

    import pandas as pd

    return pd.read_parquet(path).equals(pd.read_parquet(io.BytesIO(data)))


# -- a full disk ------------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: cannot mount a 1 MiB tmpfs here ({res.stderr.strip() or 'not root'}); the "
                    "full-disk logic is still covered by tests/contract/test_manifest.py (simulated ENOSPC)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def small_assets(tmp_path_factory) -> Path:
    from eksft_pipeline.data.tiny_assets import make_tiny_assets

    out = tmp_path_factory.mktemp("assets")
    make_tiny_assets(out, n_problems=300, n_eval_per_source=4, n_pretrain=20, pretrain=False, progress=False)
    return out


def test_full_disk_shows_the_original_error_and_recovers(small_assets, small_fs, tmp_path):
    """The split's outputs hit ENOSPC, then recording the failure in the manifest hits it too: the console shows
    the split's error (with the fix), the previous manifest is intact, and after freeing space a re-run works."""
    run = small_fs / "run"
    args = ("stage=split", "hydra.output_subdir=null", f"model.assets_dir={small_assets}", "model.data.n_sft=100")
    filler = small_fs / "filler"
    st = os.statvfs(small_fs)
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 16 * 1024))  # 16 KiB left: the manifest fits, the split not
    rc, text = run_cli(run, *args, log=tmp_path / "full.log", timeout=600)
    assert rc == 2, text[-3000:]
    last = assert_one_line_error(text, "split:", "No space left on device", "free space")
    status = Manifest(run).entry("split")["status"]  # the manifest is readable: its write was atomic
    assert status == "failed" or (status == "running" and "manifest could not record this failure" in last), (
        status, last)
    filler.unlink()
    rc, text = run_cli(run, *args, log=tmp_path / "again.log", timeout=600)
    assert rc == 0, text[-3000:]
    assert Manifest(run).entry("split")["status"] == "complete"
    assert_truthful(run)


# -- a copied run directory ---------------------------------------------------------------------------------
def test_copied_run_dir_reruns_its_own_deleted_stage(complete_tiny_run, tmp_path, capsys):
    original = complete_tiny_run.run_dir
    before = tree(original)
    run = copy_run(original, tmp_path / "copy")
    shutil.rmtree(run / "handoff")
    rc, text = run_here(run, "stage=handoff", capsys=capsys)
    assert rc == 0, text[-3000:]
    assert f"output 'report' missing: {run}/handoff/eksft/handoff_report.json" in text
    assert (run / "handoff" / "eksft" / "handoff_report.json").is_file()
    rc, text = run_here(run, "stage=rl", capsys=capsys)  # same content: complete in the copy too
    assert rc == 0 and f"rl/eksft: complete, skipped (outputs in {run}/rl/eksft)" in text, text[-2000:]
    assert_truthful(run)
    assert tree(original) == before  # the original run is untouched
    for e in Manifest(run).read()["stages"].values():
        for o in (e.get("outputs") or {}).values():
            assert str(original) not in Manifest(run).resolve(o["path"])


# -- issue 24: nothing finished is ever lost ----------------------------------------------------------------------
STAGE_ORDER = ("assets", "split", "sft", "handoff", "rl", "eval", "report")


def produced_files(run: Path) -> list[tuple[str, Path]]:
    """(stage key, file) for every file a complete stage produced in its own folder (the report excluded: nothing
    runs after it; the tiny assets excluded: they live outside the run directory)."""
    m = Manifest(run)
    out = []
    for key, e in m.read()["stages"].items():
        if key in ("assets", "report") or e.get("status") != "complete":
            continue
        for o in (e.get("outputs") or {}).values():
            if not str(o["path"]).startswith(key + "/"):
                continue  # a pointer at another stage's file (the handoff's model)
            p = Path(m.resolve(o["path"]))
            out += [(key, f) for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]
    return sorted(set(out))


def corrupt(f: Path, rng: random.Random) -> str:
    data = f.read_bytes()
    if len(data) > 1 and rng.random() < 0.5:
        f.write_bytes(data[: rng.randrange(len(data))])
        return "truncated"
    i = rng.randrange(max(len(data), 1))
    f.write_bytes(data[:i] + bytes([(data[i] if data else 0) ^ 0xFF]) + data[i + 1:])
    return "one byte flipped"


def run_later_stages(run: Path, owner: str, damaged: Path, capsys) -> list[str]:
    """Every stage after `owner`'s, in pipeline order: each is skipped (complete, untouched) or stops with ONE error
    line naming the damaged file; nothing but the manifest changes on disk."""
    before = tree(run, manifest=False)
    outcomes = []
    for name in STAGE_ORDER[STAGE_ORDER.index(owner.split("/")[0]) + 1:]:
        rc, text = run_here(run, f"stage={name}", capsys=capsys)
        if rc == 0:
            assert "complete, skipped" in text and "running" not in text, (name, text[-2000:])
            outcomes.append(f"{name}: skipped")
        else:
            last = assert_one_line_error(text, str(damaged))
            assert rc == 2, (name, rc, last)
            outcomes.append(f"{name}: {last}")
        after = tree(run, manifest=False)
        assert after == before, (name, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)))
    return outcomes


def test_a_random_damaged_file_is_named_and_nothing_complete_is_deleted(complete_tiny_run, tmp_path, capsys):
    """Issue 24's trial: one random file a complete stage produced is truncated or changed, then every later stage
    is run: each is skipped or refused in one line naming the file, before anything is cleaned."""
    run = copy_run(complete_tiny_run.run_dir, tmp_path / "run")
    rng = trial_rng("damaged-file")
    files = produced_files(run)
    assert len(files) > 20, files
    owner, f = rng.choice(files)
    how = corrupt(f, rng)
    print(f"\n[faults] damaged {f.relative_to(run)} of {owner} ({how}; seed {SEED})")
    outcomes = run_later_stages(run, owner, f, capsys)
    print("\n".join(f"[faults]   {o}" for o in outcomes))
    refused = [o for o in outcomes if not o.endswith("skipped")]
    consumers = {k for k, e in Manifest(run).read()["stages"].items() if any(
        str(i["path"]) in str(f.relative_to(run)) for i in (e.get("inputs") or {}).values())}
    if consumers - {owner}:  # someone reads it: the first of them named it and marked its producer for a re-run
        assert refused and f"re-run stage={owner.split('/')[0]}" in refused[0], outcomes
        assert Manifest(run).entry(owner)["status"] == "stale"


ISSUE_CASES = [
    # (damaged file, stage run next, its producer, how the error says to re-run it, what must survive)
    ("split/sft_train.parquet", "sft", "split", "stage=split", "sft/eksft/checkpoints"),
    ("sft/eksft/hf_model/model.safetensors", "rl", "sft/eksft", "stage=sft method=eksft", "rl/eksft/checkpoints"),
    ("rl/eksft/hf_model/model.safetensors", "eval", "rl/eksft", "stage=rl init=eksft", "eval/eksft/sft/samples"),
    ("eval/eksft/sft/metrics.json", "report", "eval/eksft", "stage=eval init=eksft", "report/report.md"),
]


def test_the_issue_cases_damaged_upstream_files_delete_nothing(complete_tiny_run, tmp_path, capsys):
    """The four failures of issue 24 on a complete run: a truncated split parquet before SFT, a truncated SFT model
    before RL, a truncated RL model before eval (its saved samples), a truncated eval metrics.json before the
    report. Each: one line naming the file and the stage to re-run, nothing deleted, the producer marked stale."""
    run = copy_run(complete_tiny_run.run_dir, tmp_path / "run")
    manifest = (run / "manifest.json").read_bytes()
    for rel, stage, producer, fix, kept in ISSUE_CASES:
        f = run / rel
        good = f.read_bytes()
        assert (run / kept).exists()
        before = tree(run, manifest=False)
        with open(f, "r+b") as fh:
            fh.truncate(len(good) // 3)
        rc, text = run_here(run, f"stage={stage}", capsys=capsys)
        last = assert_one_line_error(text, f"file {f} changed since stage {producer} completed", f"re-run {fix}")
        assert rc == 2, last
        after = tree(run, manifest=False)
        assert {k for k in set(before) | set(after) if before.get(k) != after.get(k)} == {rel}
        entry = Manifest(run).entry(producer)
        assert entry["status"] == "stale" and str(f) in entry["stale_reason"]
        f.write_bytes(good)  # restored for the next case
        (run / "manifest.json").write_bytes(manifest)
    assert_truthful(run)


def test_two_runs_of_the_same_stage_in_the_same_second(complete_tiny_run, tmp_path):
    """Both pass their checks in the same second: one claims the entry, the other is refused in one line -- it
    writes nothing over the live attempt's entry and ends none of its processes."""
    run = copy_run(complete_tiny_run.run_dir, tmp_path / "run")
    a = Orchestrator(run, "stage=report", "force=true", log=tmp_path / "a.log")
    b = Orchestrator(run, "stage=report", "force=true", log=tmp_path / "b.log")
    assert time.monotonic() - a.t0 < 1.0
    rcs = [a.proc.wait(timeout=600), b.proc.wait(timeout=600)]
    a.assert_no_survivors()
    b.assert_no_survivors()
    texts = [a.text(), b.text()]
    assert sorted(rcs) == [0, 2], (rcs, texts[0][-2000:], texts[1][-2000:])
    loser = texts[rcs.index(2)]
    assert_one_line_error(loser, "report: stage report is already running in process")
    assert "left over by an earlier attempt" not in loser
    e = Manifest(run).entry("report")
    assert e["status"] == "complete" and e["attempts"] == Manifest(complete_tiny_run.run_dir).entry("report")["attempts"] + 1
    assert_truthful(run)


ODD_DIR = "rt 5/ünïcødé 'run\" x"


def test_a_run_dir_with_spaces_quotes_and_non_ascii_trains_sft(complete_tiny_run, tmp_path):
    """Every path handed to verl's Hydra is quoted: SFT retrains (a new lr) end to end in such a run directory."""
    (tmp_path / ODD_DIR).parent.mkdir(parents=True)
    run = copy_run(complete_tiny_run.run_dir, tmp_path / ODD_DIR)
    rc, text = run_cli(run, "stage=sft", "sft.verl.optim.lr=2e-4", *SFT_SMALL, log=tmp_path / "odd.log")
    assert rc == 0, text[-4000:]
    assert "sft/eksft: complete in" in text
    assert Manifest(run).entry("sft/eksft")["status"] == "complete"
    assert (run / "sft" / "eksft" / "logs" / "hydra").is_dir()
    assert_truthful(run)
