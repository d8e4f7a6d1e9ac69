"""The command line: --help, make help, one-line errors that name the fix, command-line values that win,
and bad values rejected before anything on disk changes (fast: no verl run)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.contract.stage_api import ConfigError, StageContext
from eksft_pipeline.orchestrator.runner import run_pipeline

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> tuple[int, list[str], float]:
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "eksft_pipeline", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()]
    return res.returncode, lines, time.time() - t0


def _assert_one_line_error(code: int, lines: list[str], *needles: str) -> str:
    text = "\n".join(lines)
    assert code != 0, text
    assert "Traceback" not in text and "Set the environment variable HYDRA_FULL_ERROR" not in text, text
    last = lines[-1]
    assert last.startswith("[eksft-pipeline] error: "), text
    for n in needles:
        assert n in last, (n, last)
    return last


def test_help_describes_stages_and_main_options():
    code, lines, _ = _cli("--help")
    text = "\n".join(lines)
    assert code == 0
    for needle in ("stages", "assets", "split", "sft", "handoff", "rl", "eval", "report", "model=", "method=",
                   "cluster=", "init=", "run_dir=", "force=true", "dry_run=true", "sft.verl.", "eksft, "):
        assert needle in text, needle
    assert "Powered by Hydra" not in text  # not Hydra's generic help


def test_make_help_lists_every_target():
    make = REPO / "Makefile"
    targets = re.findall(r"^([a-zA-Z][\w.-]*):", make.read_text(), flags=re.M)
    res = subprocess.run(["make", "-s", "-f", str(make), "help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    listed = dict(re.findall(r"^\s+make (\S+)\s+(.*)$", res.stdout, flags=re.M))
    assert set(targets) <= set(listed), set(targets) - set(listed)
    assert all(listed[t].strip() for t in targets), {t: listed[t] for t in targets if not listed[t].strip()}


@pytest.mark.parametrize("value,needle", [("", "run_dir is empty"), ("FILE", "is a file, not a directory")])
def test_bad_run_dir_is_one_line_and_writes_nothing(tmp_path, value, needle):
    if value == "FILE":
        value = str(tmp_path / "a_file")
        Path(value).write_text("x")
    before = sorted(p.name for p in REPO.iterdir())
    code, lines, _ = _cli("stage=split", f"run_dir={value}", cwd=tmp_path)
    _assert_one_line_error(code, lines, needle, "run_dir=runs/")
    assert sorted(p.name for p in REPO.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["a_file"] if "file" in needle else [])
    with pytest.raises(ConfigError, match=needle):
        run_pipeline(compose_pipeline("stage=split", f"run_dir={value}"))


def test_run_dir_that_is_the_repository_is_rejected():
    with pytest.raises(ConfigError, match="use run_dir=runs/"):
        run_pipeline(compose_pipeline("stage=split", f"run_dir={REPO}"))


def test_bad_override_is_one_line_listing_the_options(tmp_path):
    code, lines, _ = _cli("model=nosuch", f"run_dir={tmp_path / 'run'}")
    _assert_one_line_error(code, lines, "Could not find 'model/nosuch'", "qwen3-8b, qwen3-8b-base, tiny")


def test_unknown_init_names_itself_not_a_missing_stage(tmp_path):
    code, lines, _ = _cli("stage=rl", "init=nosuch", f"run_dir={tmp_path / 'run'}")
    last = _assert_one_line_error(code, lines, "init='nosuch' is neither a method", "fix: init=")
    assert "has no complete output" not in last
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_offline_hub_model_fails_fast_in_one_line(tmp_path):
    from eksft_pipeline.models.hub import resolve_model_dir

    try:
        resolve_model_dir("Qwen/Qwen3-8B-Base")
        pytest.skip("Qwen/Qwen3-8B-Base is in this machine's HF cache: nothing to fail on")
    except FileNotFoundError:
        pass
    code, lines, wall = _cli("model=qwen3-8b", "cluster=cpu", "stage=split", f"run_dir={tmp_path / 'run'}")
    _assert_one_line_error(code, lines, "Qwen/Qwen3-8B", "huggingface-cli download", "model=tiny")
    assert wall < 45, f"{wall:.0f}s: network retries instead of failing at once"
    assert not (tmp_path / "run" / "split").exists()


def test_unexpected_errors_are_one_line_with_the_traceback_kept(tmp_path, capsys):
    from eksft_pipeline.orchestrator.runner import report_error

    try:
        {}["x"].y  # noqa: B018 - a bug, not a user error
    except Exception:  # noqa: BLE001
        pass
    e = ZeroDivisionError("division by zero\nsecond line")
    e.stage_key = "eval/eksft"
    code = report_error(e, compose_pipeline(f"run_dir={tmp_path}"))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert code == 1 and lines[-1].startswith("[eksft-pipeline] error: eval/eksft: ZeroDivisionError: division by zero")
    path = re.search(r"full traceback in (\S+);", lines[-1]).group(1)
    assert Path(path).is_file() and "ZeroDivisionError" in Path(path).read_text()


def _ctx(cfg, tmp_path: Path, key: str) -> StageContext:
    return StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key=key, dry_run=True)


def test_command_line_value_wins_over_the_model_recipe(tmp_path):
    """recipes/model/tiny.yaml sets model.sft.verl.optim.lr (3e-4 for task=math, model.task_sft) and rl save_freq=1;
    typed values must win."""
    from eksft_pipeline.rl.stage import RLStage
    from eksft_pipeline.sft.stage import SFTStage

    vc = SFTStage().verl_config(_ctx(compose_pipeline("sft.verl.optim.lr=5e-4"), tmp_path, "sft/eksft"))
    assert vc.optim.lr == 5e-4
    vc = SFTStage().verl_config(_ctx(compose_pipeline(), tmp_path, "sft/eksft"))
    assert vc.optim.lr == OmegaConf.load(REPO / "recipes/model/tiny.yaml").task_sft.math.lr != 5e-4  # the recipe's
    vc = RLStage().verl_config(_ctx(compose_pipeline("+rl.verl.trainer.save_freq=3"), tmp_path, "rl/eksft"))
    assert vc.trainer.save_freq == 3
    # a key the stage sets itself is rejected instead of silently undone
    with pytest.raises(ConfigError, match="rl.max_response_length"):
        RLStage().verl_config(_ctx(compose_pipeline("+rl.verl.data.max_response_length=64"), tmp_path, "rl/eksft"))


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    from eksft_pipeline.data.tiny_assets import make_tiny_assets

    assets = tmp_path_factory.mktemp("assets")
    make_tiny_assets(assets, n_problems=200, n_eval_per_source=4, n_pretrain=20, pretrain=False, progress=False)
    run = tmp_path_factory.mktemp("run")
    common = (f"run_dir={run}", f"model.assets_dir={assets}", "model.data.n_sft=50")
    assert run_pipeline(compose_pipeline("stage=split", *common))[0]["status"] == "complete"
    return run, common


@pytest.mark.parametrize("bad,needle", [
    ("split.think_prefix=bogus", "split.think_prefix='bogus' must be one of"),
    ("split.n_sft=0", "split.n_sft=0 must be > 0"),
    ("method.params.rho=-0.5", "rho"),
    ("init=nosuch", "neither a method"),
])  # fmt: skip
def test_bad_value_on_a_complete_run_changes_nothing_on_disk(split_run, bad, needle):
    """Validation before cleaning: the complete split (and the manifest) are exactly as they were."""
    run, common = split_run
    stage = "split" if bad.startswith("split") else ("rl" if bad.startswith("init") else "sft")
    before = _tree(run)
    with pytest.raises((ConfigError, ValueError), match=needle):
        run_pipeline(compose_pipeline(f"stage={stage}", *common, bad))
    assert _tree(run) == before
    assert Manifest(run).entry("split")["status"] == "complete"


def test_dropped_rows_say_what_is_wrong(tmp_path):
    from eksft_pipeline.data.split import split_dataset

    samples = REPO / "data" / "samples"
    d = tmp_path / "in"
    d.mkdir()
    for f in ("openr1_math_bad_rows.jsonl", "openr1_math_sample.jsonl"):
        (d / f).write_bytes((samples / f).read_bytes())
    split_dataset(d, tmp_path / "out", n_sft=8, seed=0, progress=False)
    dropped = [json.loads(x) for x in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert dropped and all(x["detail"].strip() for x in dropped), [x for x in dropped if not x["detail"].strip()]
    by = {x["reason"]: x["detail"] for x in dropped}
    assert "ground_truth" in by["missing_answer"] and "JSON" in by["invalid_json"]
    assert "missing column(s)" in by["missing_field"]
