"""Issue 24's guarantees, unit by unit (cheap: no verl run, no tiny pipeline; the same failures on a real run are
trials in tests/orchestrator/test_faults.py):

* an input is checked against the record of the stage that produced it before anything is cleaned, naming the
  file and the stage to re-run (a large file by its fingerprint first);
* the check and the claim of a manifest entry are one locked step; `fail` / `complete` only by the owner;
* the first real exception of a failed subprocess is the console's error line, with the log kept;
* every path handed to verl's Hydra survives spaces, quotes and non-ASCII letters;
* verl values are type- and range-checked against verl's dataclasses / the recipe's types;
* the smaller items: force=true's Ctrl-C advice, `make reproduce MODEL=<typo>`, a GPU recipe without GPUs,
  missing eval data said up front.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eksft_pipeline.contract import manifest as mf
from eksft_pipeline.contract.manifest import InputChanged, Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.contract.stage_api import ConfigError, PipelineError, Stage, StageContext, StageResult
from eksft_pipeline.orchestrator import runner

REPO = Path(__file__).resolve().parents[2]


def _complete(m: Manifest, key: str, outputs: dict[str, Path], inputs: dict[str, Path] | None = None) -> None:
    m.start(key, {"k": key}, f"h-{key}", {k: str(v) for k, v in (inputs or {}).items()})
    m.complete(key, {k: str(v) for k, v in outputs.items()})


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(("manifest.json", ".hash_cache", ".manifest"))}


# -- integrity of inputs ----------------------------------------------------------------------------------------
def test_a_damaged_input_names_the_file_and_its_producer_and_marks_it_for_a_rerun(tmp_path, monkeypatch):
    run = tmp_path / "run"
    hf = run / "sft" / "x" / "hf_model"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(os.urandom(4096))
    m = Manifest(run)
    monkeypatch.setattr(mf, "CACHE_MIN_BYTES", 1024)  # the weights count as "large": fingerprinted
    _complete(m, "sft/x", {"hf_model": hf})
    _complete(m, "handoff/x", {"model": hf})  # a pointer at the SFT model, as the handoff records it
    rec = m.entry("sft/x")["outputs"]["hf_model"]
    assert set(rec["files"]) == {"config.json", "model.safetensors"} and "model.safetensors" in rec["fingerprints"]
    m.verify_inputs("rl/x", {"model": str(hf)})  # intact: nothing to say

    with open(hf / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    calls = []
    monkeypatch.setattr(mf, "_sha256_file", lambda p: calls.append(p) or "x")
    with pytest.raises(InputChanged) as e:
        m.verify_inputs("rl/x", {"model": str(hf)})
    msg = str(e.value)
    assert "\n" not in msg
    assert f"file {hf / 'model.safetensors'} changed since stage sft/x completed" in msg
    assert "re-run stage=sft method=x" in msg
    assert not calls, "a truncated large file is named by its fingerprint, without hashing all of it"
    stages = m.read()["stages"]
    assert stages["sft/x"]["status"] == "stale" and stages["handoff/x"]["status"] == "stale"
    assert "model.safetensors changed after it completed" in stages["sft/x"]["stale_reason"]
    assert (hf / "model.safetensors").stat().st_size == 1000  # nothing deleted or rewritten
    with pytest.raises(FileNotFoundError, match="model.safetensors changed after it completed"):
        m.outputs("handoff/x")


def test_same_size_change_and_missing_file_are_named(tmp_path):
    run = tmp_path / "run"
    split = run / "split"
    split.mkdir(parents=True)
    (split / "a.parquet").write_bytes(b"PAR1" + b"0" * 100)
    (split / "tok").mkdir()
    (split / "tok" / "t.json").write_text("{}")
    m = Manifest(run)
    _complete(m, "split", {"sft_train": split / "a.parquet", "tokenizer": split / "tok"})
    (split / "a.parquet").write_bytes(b"PAR1" + b"1" * 100)  # same size, new content
    with pytest.raises(InputChanged, match=r"a\.parquet changed since stage split completed.*re-run stage=split"):
        m.verify_inputs("sft/x", {"sft_train": str(split / "a.parquet")})
    _complete(m, "split", {"tokenizer": split / "tok"})
    (split / "tok" / "t.json").unlink()
    with pytest.raises(InputChanged, match=r"tok/t\.json is missing since stage split completed"):
        m.verify_inputs("sft/x", {"tokenizer": str(split / "tok")})


class _Producer(Stage):
    name = "split"

    def run(self, ctx):
        (ctx.out_dir / "data.txt").write_text("made by split")
        return StageResult(outputs={"data": str(ctx.out_dir / "data.txt")})


class _Consumer(Stage):
    name = "sft"

    def key(self, cfg):
        return "sft/x"

    def inputs(self, ctx):
        return {"data": ctx.upstream("split")["data"]}

    def run(self, ctx):
        (ctx.out_dir / "result.txt").write_text(Path(ctx.upstream("split")["data"]).read_text() + " -> sft")
        return StageResult(outputs={"result": str(ctx.out_dir / "result.txt")})


def test_the_runner_checks_inputs_before_it_cleans_anything(tmp_path, monkeypatch, capsys):
    stages = {"split": _Producer, "sft": _Consumer}
    monkeypatch.setattr(runner, "load_stage", lambda name: stages[name]())
    run = tmp_path / "run"

    def go(*args):
        return runner.main_from_config(compose_pipeline(f"run_dir={run}", "tracking=none", *args))

    assert go("stage=split") == 0 and go("stage=sft") == 0
    before = _tree(run)
    (run / "split" / "data.txt").write_text("damaged")
    capsys.readouterr()
    assert go("stage=sft", "force=true") == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[eksft-pipeline] error: sft/x: file ") and "data.txt changed since stage split" in last
    after = _tree(run)
    assert after["sft/x/result.txt"] == before["sft/x/result.txt"]  # the consumer's outputs are untouched
    entries = Manifest(run).read()["stages"]
    assert entries["split"]["status"] == "stale" and entries["sft/x"]["status"] == "complete"
    assert entries["sft/x"]["attempts"] == 1  # no attempt was even recorded


# -- one owner per stage -------------------------------------------------------------------------------------
def _claim(run: str, barrier, done, out) -> None:
    m = Manifest(run)
    barrier.wait()
    try:
        m.start("split", {}, "h", {}, run_token=f"tok-{os.getpid()}", live_owner=runner._live_owner("split"))
        out.put(("claimed", os.getpid()))
    except PipelineError as e:
        out.put(("refused", str(e)))
    done.wait()  # the winner stays alive until both have tried


def test_two_runs_claiming_the_same_stage_in_the_same_second_one_wins(tmp_path):
    ctx = mp.get_context("fork")
    barrier, done, out = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
    ps = [ctx.Process(target=_claim, args=(str(tmp_path), barrier, done, out)) for _ in range(2)]
    t0 = time.monotonic()
    for p in ps:
        p.start()
    res = [out.get(timeout=30) for _ in ps]
    for p in ps:
        p.join(timeout=30)
    assert time.monotonic() - t0 < 30
    kinds = sorted(r[0] for r in res)
    assert kinds == ["claimed", "refused"], res
    winner = next(r[1] for r in res if r[0] == "claimed")
    assert f"already running in process {winner}" in next(r[1] for r in res if r[0] == "refused")
    assert Manifest(tmp_path).entry("split")["run_token"] == f"tok-{winner}"


def test_only_the_owner_records_failure_or_completion(tmp_path):
    m = Manifest(tmp_path)
    (tmp_path / "out.txt").write_text("x")
    m.start("split", {}, "h", {}, run_token="live")
    assert m.fail("split", "boom", run_token="loser") is False
    assert m.entry("split")["status"] == "running"
    with pytest.raises(RuntimeError, match="another attempt owns"):
        m.complete("split", {"out": str(tmp_path / "out.txt")}, run_token="loser")
    assert m.entry("split")["status"] == "running"
    m.complete("split", {"out": str(tmp_path / "out.txt")}, run_token="live")
    assert m.entry("split")["status"] == "complete"


# -- the cause on the console ------------------------------------------------------------------------------------
TORCHRUN_LOG = """\
$ torchrun ...
W1204 torch/distributed/run.py:792] Setting OMP_NUM_THREADS environment variable for each process to be 1
[rank0]: Traceback (most recent call last):
[rank0]:   File "/venv/verl/trainer/sft_trainer.py", line 120, in _build_dataset
[rank0]:     df = pd.read_parquet(path)
[rank0]:   File "/venv/pyarrow/parquet/core.py", line 1843, in read_table
[rank0]:     return pq.read_table(path)
[rank0]: pyarrow.lib.ArrowInvalid: Could not open Parquet input source '/runs/x y/split/sft_train.parquet': Parquet magic bytes not found in footer.
E1204 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 1) local_rank: 0 (pid: 123)
Traceback (most recent call last):
  File "/venv/bin/torchrun", line 8, in <module>
    sys.exit(main())
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
eksft_pipeline.verl_ext.sft_main FAILED
"""


def test_the_first_real_exception_of_a_log_is_found():
    from eksft_pipeline.contract.artifacts import first_exception

    hit = first_exception(TORCHRUN_LOG)
    assert hit["exception"].startswith("ArrowInvalid: Could not open Parquet input source")
    assert hit["frame"] == "/venv/pyarrow/parquet/core.py:1843"
    assert hit["file"] == "/runs/x"  # the first path token of the message (spaces end it)
    assert hit["line_no"] == 8
    ray = "(TaskRunner pid=77) Traceback (most recent call last):\n(TaskRunner pid=77)   File \"a.py\", line 3, in f\n" \
          "(TaskRunner pid=77) safetensors_rust.SafetensorError: Error while deserializing header: incomplete metadata\n"
    assert first_exception(ray)["exception"].startswith("SafetensorError: Error while deserializing header")
    assert first_exception("all good\nno traceback here\n") is None


def test_a_failed_subprocess_shows_its_first_exception_in_one_line(tmp_path, capsys):
    """Generic: any subprocess the training stages launch (torchrun today); the full log stays where it was."""
    from eksft_pipeline.contract.artifacts import StepProgress
    from eksft_pipeline.verl_ext.verl_stage import VerlTrainingStage

    script = tmp_path / "child.py"
    script.write_text(
        "import subprocess, sys\n"
        "for i in range(60): print(f'noise line {i}')\n"
        "code = \"raise FileNotFoundError(2, 'No such file or directory', '/data/missing file.parquet')\"\n"
        "r = subprocess.run([sys.executable, '-c', code])\n"
        "for i in range(40): print(f'shutdown line {i}')\n"
        "raise RuntimeError('child failed with exit code %d' % r.returncode)\n")
    st = VerlTrainingStage()
    st.what = "the child"
    ctx = StageContext(cfg=OmegaConf.create({}), run_dir=tmp_path, manifest=Manifest(tmp_path), key="sft/x")
    log = tmp_path / "sft" / "x" / "logs" / "train.log"
    with pytest.raises(PipelineError) as e:
        st.train(ctx, [sys.executable, str(script)], dict(os.environ), log, StepProgress("sft/x", {}))
    msg = str(e.value)
    assert "\n" not in msg and not e.value.details
    assert "FileNotFoundError: [Errno 2] No such file or directory: '/data/missing file.parquet'" in msg
    assert f"full log: {log}" in msg and "RuntimeError" not in msg
    assert "shutdown line 39" in log.read_text()


# -- paths handed to Hydra -----------------------------------------------------------------------------------------
ODD = "/tmp/rt 5/ünïcødé 'run\" x=[1]\\"


def test_hydra_paths_survive_spaces_quotes_and_non_ascii(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from eksft_pipeline.rl.stage import RLStage
    from eksft_pipeline.sft.stage import SFTStage

    parser = OverridesParser.create()
    run = Path(ODD) / "run"
    cfg = compose_pipeline(f"run_dir={tmp_path}", "init=eksft")
    for stage in (SFTStage(), RLStage()):
        ctx = StageContext(cfg=cfg, run_dir=run, manifest=Manifest(tmp_path), key=stage.key(cfg), dry_run=True)
        cmd = stage.command(ctx)
        hydra_args = [a for a in cmd if a.startswith("hydra.")]
        parsed = {o.key_or_group: o.value() for o in parser.parse_overrides(hydra_args)}
        assert parsed["hydra.run.dir"] == str(run / stage.key(cfg) / "logs" / "hydra")
        assert f"--config-path={run / stage.key(cfg)}" in cmd


# -- verl values ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (("stage=sft", "sft.verl.optim.lr=abc"), "sft.verl.optim.lr='abc' is not a float (verl's FSDPOptimizerConfig.lr)"),
    (("stage=sft", "sft.verl.optim.lr=-1"), "sft.verl.optim.lr=-1 must be > 0"),
    (("stage=sft", "sft.verl.data.train_batch_size=2.5"), "sft.verl.data.train_batch_size=2.5 must be an integer"),
    (("stage=sft", "sft.verl.trainer.total_epochs=abc"), "sft.verl.trainer.total_epochs='abc' is not a number"),
    (("stage=rl", "+rl.verl.actor_rollout_ref.actor.optim.lr=abc"),
     "rl.verl.actor_rollout_ref.actor.optim.lr='abc' is not a float"),
    (("stage=rl", "+rl.verl.actor_rollout_ref.rollout.temperature=hot"), "rollout.temperature='hot' is not a float"),
    (("stage=rl", "+rl.verl.actor_rollout_ref.rollout.top_p=1.5"), "rollout.top_p=1.5 must be in (0, 1]"),
    (("stage=rl", "+rl.verl.data.train_batch_size=x"), "rl.verl.data.train_batch_size='x' is not a number"),
    (("stage=rl", "+rl.verl.trainer.total_epochs=0"), "rl.verl.trainer.total_epochs=0 must be > 0"),
])
def test_verl_values_are_type_and_range_checked(tmp_path, args, needle):
    from eksft_pipeline.contract.artifacts import quiet

    cfg = compose_pipeline(f"run_dir={tmp_path}", *args)
    stage = runner.load_stage(args[0].split("=")[1])
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key=stage.key(cfg), dry_run=True)
    with pytest.raises(ConfigError) as e, quiet():
        stage.validate(ctx)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_recipe_values_and_verl_words_pass(tmp_path):
    from eksft_pipeline.verl_ext.validate import check_verl_values

    check_verl_values({"trainer": {"save_freq": "after_each_epoch"}}, {"trainer": {"save_freq": -1}}, "sft.verl")
    check_verl_values({"optim": {"lr": 5e-4}}, {"optim": {"lr": 1e-5}}, "sft.verl")
    with pytest.raises(ValueError, match=r"sft.verl.trainer.save_freq='often' is not a number"):
        check_verl_values({"trainer": {"save_freq": "often"}}, {"trainer": {"save_freq": -1}}, "sft.verl")


# -- the smaller items -------------------------------------------------------------------------------------------
def test_ctrl_c_under_force_says_how_to_resume(capsys):
    cfg = OmegaConf.create({"force": True, "run_dir": "/tmp/x"})
    assert runner.report_error(KeyboardInterrupt(), cfg) == 130
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "WITHOUT force=true to resume" in line
    runner.report_error(KeyboardInterrupt(), OmegaConf.create({"force": False}))
    assert capsys.readouterr().out.strip().endswith("re-run the same command to resume")


def test_make_reproduce_refuses_an_unknown_model():
    bad = subprocess.run(["make", "-n", "reproduce", "MODEL=qwen3-8bb"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown model MODEL=qwen3-8bb; known models:" in bad.stderr
    assert "qwen3-8b" in bad.stderr and "tiny" in bad.stderr
    ok = subprocess.run(["make", "-n", "reproduce", "MODEL=qwen3-8b", "DRY_RUN=1"], cwd=REPO, capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "dry_run=true" in ok.stdout


@pytest.mark.skipif(runner.gpu_count() > 0, reason="this machine has GPUs")
def test_a_gpu_recipe_without_gpus_is_refused_at_once_but_its_dry_run_works(tmp_path, capsys):
    t0 = time.monotonic()
    rc = runner.main_from_config(compose_pipeline(f"run_dir={tmp_path / 'run'}", "model=qwen3-8b", "cluster=8gpu"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 2 and "cluster=8gpu needs CUDA GPUs" in line and "cluster=cpu" in line, line
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_missing_eval_data_is_said_up_front(tmp_path, capsys):
    args = (f"run_dir={tmp_path / 'run'}", "model=qwen3-8b", "cluster=cpu", f"eval_data_dir={tmp_path / 'nope'}")
    rc = runner.main_from_config(compose_pipeline(*args, "stage=all"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 2 and "eval benchmark file(s) not found" in line and str(tmp_path / "nope") in line, line
    assert not (tmp_path / "run" / "manifest.json").exists()
    cfg = compose_pipeline(*args, "stage=eval", "dry_run=true")
    runner.eval_data_note(cfg, ["eval"])
    assert "warning: eval benchmark file(s) not found" in capsys.readouterr().out


def test_report_names_a_json_file_that_does_not_parse(tmp_path):
    from eksft_pipeline.analysis.gather import _load_json

    bad = tmp_path / "metrics.json"
    bad.write_text('{"a": "unterminated')
    with pytest.raises(ValueError, match=f"{bad} is not valid JSON"):
        _load_json(bad)
    json.loads('{"ok": 1}')
