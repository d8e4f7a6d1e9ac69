"""Tracking wired into the pipeline: recipes, the runner's identity per stage attempt (manifest record, resume keeps
the run id, a changed config gets a new one, tracking never forces a re-run), the verl config / environment of the
SFT and RL stages, eval's tracker runs, the report's Tracking section and `report.source=tracker`, and the one
split-report reader. Real wandb / TensorBoard, offline, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eksft_pipeline.contract import tracking as T
from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline, recipes_dir
from eksft_pipeline.contract.stage_api import Stage, StageContext, StageResult
from eksft_pipeline.orchestrator import runner

NO_CREDS = {"HOME": "/nonexistent"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: offline
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RUN_GROUP", "TENSORBOARD_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


# -- recipes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,backends", [("none", ()), ("wandb", ("wandb",)), ("tensorboard", ("tensorboard",))])
def test_tracking_recipes_compose(name, backends):
    cfg = compose_pipeline(f"tracking={name}")
    s = T.settings_from_config(cfg)
    assert s.backends == backends and s.project == "eksft-pipeline" and s.group is None and s.mode is None
    assert compose_pipeline().tracking.name == "none"  # the default: off
    two = T.settings_from_config(compose_pipeline("tracking=wandb", "tracking.backends=[wandb,tensorboard]",
                                                  "tracking.tags=[sweep1]"))
    assert two.backends == ("wandb", "tensorboard") and two.tags == ("sweep1",)


def test_no_cluster_recipe_sets_wandb_mode():
    """The tracker owns WANDB_MODE (offline without credentials); a cluster recipe hard-coding it would override
    `tracking.mode=online` for verl's processes."""
    for p in sorted((recipes_dir() / "cluster").glob("*.yaml")):
        env = OmegaConf.load(p).get("env") or {}
        assert "WANDB_MODE" not in env, p.name


# -- the runner: identity per attempt, recorded in the manifest ------------------------------------------------
class _Fake(Stage):
    """A tracked stage whose config is `+fake_x`, failing while `+fake_fail=true`."""

    name = "report"
    tracked = True
    seen: list = []

    def config(self, cfg):
        return {"x": cfg.get("fake_x")}

    def run(self, ctx: StageContext) -> StageResult:
        type(self).seen.append(ctx.tracking)
        if ctx.cfg.get("fake_fail"):
            raise RuntimeError("boom")
        (ctx.out_dir / "out.txt").write_text("x")
        return StageResult(outputs={"out": str(ctx.out_dir / "out.txt")})


def _cfg(run_dir, *extra):
    return compose_pipeline("stage=report", f"run_dir={run_dir}", *extra)


def test_runner_records_identity_resume_keeps_id_changed_config_new_id(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_stage", lambda name: _Fake())
    _Fake.seen = []
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        runner.run_pipeline(_cfg(run_dir, "tracking=wandb", "+fake_x=1", "+fake_fail=true"))
    m = Manifest(run_dir)
    group = m.read()["tracking_group"]
    first = m.entry("report")["tracking"]
    assert first["group"] == group and group.startswith("tiny-run-")
    assert first["name"] == "report" and first["backends"] == ["wandb"] and first["mode"] == "offline"
    assert first["job_type"] == "report" and first["dirs"] == {"wandb": "tracking"} and not first["resumed"]
    assert _Fake.seen[-1].run_id == first["run_id"]

    # the failed attempt, same config: the resume continues its tracker run
    runner.run_pipeline(_cfg(run_dir, "tracking=wandb", "+fake_x=1"))
    again = m.entry("report")["tracking"]
    assert again["run_id"] == first["run_id"] and again["resumed"] and m.entry("report")["status"] == "complete"

    # tracking is no part of the stage's hash: switching it off (or its mode) skips the complete stage
    assert runner.run_pipeline(_cfg(run_dir, "+fake_x=1"))[0]["status"] == "skipped"
    assert runner.run_pipeline(_cfg(run_dir, "tracking=tensorboard", "+fake_x=1"))[0]["status"] == "skipped"

    # a changed config: a new tracker run, same group
    runner.run_pipeline(_cfg(run_dir, "tracking=wandb", "+fake_x=2"))
    new = m.entry("report")["tracking"]
    assert new["run_id"] != first["run_id"] and not new["resumed"] and new["group"] == group
    assert m.read()["tracking_group"] == group
    # tracking.group= names the group explicitly
    runner.run_pipeline(_cfg(run_dir, "tracking=wandb", "tracking.group=my-sweep", "+fake_x=3"))
    assert m.entry("report")["tracking"]["group"] == "my-sweep"

    # tracking off: no identity, no record
    runner.run_pipeline(_cfg(run_dir, "+fake_x=4"))
    assert _Fake.seen[-1] is None and "tracking" not in m.entry("report")


def test_untracked_stages_get_no_tracker_run(tmp_path, monkeypatch):
    class Split(_Fake):
        name = "split"
        tracked = False

    monkeypatch.setattr(runner, "load_stage", lambda name: Split())
    runner.run_pipeline(compose_pipeline("stage=split", f"run_dir={tmp_path}", "tracking=wandb", "+fake_x=1"))
    assert "tracking" not in Manifest(tmp_path).entry("split")
    assert "tracking_group" not in Manifest(tmp_path).read()


def test_bad_backend_is_a_config_error(tmp_path):
    from eksft_pipeline.contract.stage_api import ConfigError

    with pytest.raises(ConfigError, match=r"unknown backend\(s\) \['wandbb'\]"):
        runner.run_pipeline(_cfg(tmp_path / "r", "tracking=wandb", "tracking.backends=[wandbb]", "dry_run=true"))


# -- the verl stages ------------------------------------------------------------------------------------------
def _ctx(cfg, run_dir: Path, key: str, backends=("wandb",)) -> StageContext:
    ident = None
    if backends:
        ident = T.identity_for(T.TrackingSettings(backends=tuple(backends)), stage_key=key, run_dir=run_dir,
                               group="grp", previous=None, config_hash="h", environ=NO_CREDS)
    return StageContext(cfg=cfg, run_dir=run_dir, manifest=Manifest(run_dir), key=key, dry_run=True, tracking=ident)


def test_sft_verl_config_and_env_with_tensorboard_and_without_tracking(tmp_path):
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline("model=tiny", "cluster=cpu", "tracking=tensorboard")
    stage = SFTStage()
    ctx = _ctx(cfg, tmp_path, "sft/eksft", backends=("tensorboard",))
    vc = stage.verl_config(ctx)
    assert list(vc.trainer.logger) == ["console", "file", "tensorboard"]
    assert vc.trainer.experiment_name == "sft/eksft" and vc.trainer.project_name == "eksft-pipeline"
    env = stage.tracking_env(ctx)
    assert Path(env["TENSORBOARD_DIR"]) == tmp_path / "tracking" / "tensorboard" / ctx.tracking.run_id
    assert not Path(env["TENSORBOARD_DIR"]).exists()  # a dry run creates nothing
    assert env["TENSORBOARD_DIR"] in json.dumps(stage.describe(ctx)["env"])

    off = _ctx(compose_pipeline("model=tiny", "cluster=cpu"), tmp_path, "sft/eksft", backends=())
    vc = stage.verl_config(off)
    assert list(vc.trainer.logger) == ["console", "file"]  # exactly as before
    assert vc.trainer.experiment_name == "tiny-sft-eksft" and stage.tracking_env(off) == {}


def test_rl_tracker_identity_reaches_the_ray_job(tmp_path):
    """verl's wandb.init runs in the TaskRunner (a Ray actor): the identity must be in the job's runtime env;
    verl passes name= and project= explicitly, so they are set in the verl config."""
    from eksft_pipeline.rl.stage import RLStage

    cfg = compose_pipeline("model=tiny", "cluster=cpu", "init=eksft", "tracking=wandb",
                           "tracking.backends=[wandb,tensorboard]")
    stage = RLStage()
    ctx = _ctx(cfg, tmp_path, "rl/eksft", backends=("wandb", "tensorboard"))
    env = stage.stage_env(ctx, tmp_path / "m.jsonl")
    vc = stage.verl_config(ctx, env=env)
    ev = vc.ray_kwargs.ray_init.runtime_env.env_vars
    ident = ctx.tracking
    assert ev["WANDB_RUN_ID"] == ident.run_id and ev["WANDB_RUN_GROUP"] == "grp" and ev["WANDB_RESUME"] == "allow"
    assert ev["WANDB_JOB_TYPE"] == "rl" and ev["WANDB_MODE"] == "offline" and ev["WANDB_DIR"] == str(tmp_path / "tracking")
    assert ev["TENSORBOARD_DIR"] == str(tmp_path / "tracking" / "tensorboard" / ident.run_id)
    assert vc.trainer.experiment_name == "rl/eksft" and list(vc.trainer.logger)[-2:] == ["wandb", "tensorboard"]
    stage.validate_verl(vc)


def test_identity_of_reads_the_manifest_record_of_a_ray_task(tmp_path):
    ident = T.identity_for(T.TrackingSettings(backends=("wandb",)), stage_key="sft/eksft", run_dir=tmp_path,
                           group="g", previous=None, config_hash="h", environ=NO_CREDS)
    Manifest(tmp_path).update("sft/eksft", tracking=ident.record(tmp_path))
    cfg = compose_pipeline("tracking=wandb")
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key="sft/eksft")
    back = T.identity_of(ctx)
    assert back.run_id == ident.run_id and back.dirs == {"wandb": str(tmp_path / "tracking")}
    child = back.child("rl")
    assert child.name == "sft/eksft/rl" and child.run_id == f"{ident.run_id}-rl"


# -- eval -----------------------------------------------------------------------------------------------------
def _metrics():
    return {"target": "rl", "model": "/m", "sampling": {"n": 4},
            "benchmarks": {
                "aime": {"n_samples": 4, "n_problems": 3, "avg@n": 0.25,
                         "pass@k": {"1": 0.25, "2": 0.4, "3": 0.5, "4": 0.6}, "maj@k": {"1": 0.2, "4": 0.3}},
                "amc": {"n_samples": 2, "n_problems": 5, "avg@n": 0.5, "pass@k": {"1": 0.5, "2": 0.7},
                        "maj@k": {"2": 0.5}}}}  # fmt: skip


def test_eval_metrics_land_in_the_tracker_history(tmp_path):
    from eksft_pipeline.eval.stage import eval_table, log_eval_metrics

    base = T.identity_for(T.TrackingSettings(backends=("wandb", "tensorboard")), stage_key="eval/eksft",
                          run_dir=tmp_path, group="grp", previous=None, config_hash="h", environ=NO_CREDS)
    ident = log_eval_metrics(base.child("rl"), _metrics())
    dirs = T.wandb_run_dirs(tmp_path / "tracking", ident.run_id)
    assert len(dirs) == 1
    info = T.read_wandb_run_info(dirs[0])
    assert info["name"] == "eval/eksft/rl" and info["group"] == "grp" and info["job_type"] == "eval"
    hist = T.history(ident.record(tmp_path), tmp_path)
    assert sorted(hist) == [1, 2, 3, 4]
    assert [hist[k]["aime/pass@k"] for k in (1, 2, 3, 4)] == pytest.approx([0.25, 0.4, 0.5, 0.6])
    assert hist[1]["aime/avg@n"] == 0.25 and hist[1]["amc/avg@n"] == 0.5 and hist[1]["mean/avg@n"] == 0.375
    assert "amc/pass@k" not in hist[3] and hist[2]["amc/maj@k"] == 0.5
    t = eval_table(_metrics())
    assert len(t) == 6 and list(t[t.benchmark == "amc"]["pass@k"]) == [0.5, 0.7]
    # TensorBoard: the same scalars in the child's own folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(ident.dirs["tensorboard"])
    acc.Reload()
    assert [e.value for e in acc.Scalars("aime/pass@k")] == pytest.approx([0.25, 0.4, 0.5, 0.6])


# -- report -----------------------------------------------------------------------------------------------------
def test_report_tracking_section_and_tracker_source(tmp_path):
    """gather(source="tracker") reads the SFT curve from the W&B history (matching the metrics file), falls back to
    the file (and says so) for a stage without a tracker run; the Tracking section lists every run."""
    from eksft_pipeline.analysis.gather import gather
    from eksft_pipeline.analysis.stage import Report, section_tracking

    run_dir = tmp_path / "run"
    m = Manifest(run_dir)
    group = m.meta("tracking_group", lambda: "tiny-run-abc")
    steps = {1: {"train/loss": 2.0, "eksft/mask_frac": 0.3}, 2: {"train/loss": 1.5, "eksft/mask_frac": 0.31}}
    for key, tracked in (("sft/eksft", True), ("sft/sft", False)):
        d = run_dir / key
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({str(s): v for s, v in steps.items()}))
        m.update(key, status="complete", outputs={"metrics": {"path": f"{key}/metrics.json", "hash": None}},
                 summary={}, config={"method": {"name": key.split("/")[1]}})
        if tracked:
            ident = T.identity_for(T.TrackingSettings(backends=("wandb",)), stage_key=key, run_dir=run_dir,
                                   group=group, previous=None, config_hash="h", environ=NO_CREDS)
            with T.StageRun(ident) as run:  # what verl's wandb logger writes: the same values at the same steps
                for s, v in steps.items():
                    run.log({**v, "train/loss": v["train/loss"] + 10}, step=s)  # distinguishable from the file
            m.update(key, tracking=ident.record(run_dir))
    files = gather([run_dir])
    tracker = gather([run_dir], source="tracker")
    assert files.sft_metrics["eksft"][2]["train/loss"] == 1.5
    assert tracker.sft_metrics["eksft"][2]["train/loss"] == 11.5 and tracker.sft_metrics["eksft"][1]["eksft/mask_frac"] == 0.3
    assert tracker.sft_metrics["sft"][2]["train/loss"] == 1.5  # no tracker run: the file
    assert any("sft/sft: metrics file (no tracker run recorded)" in n for n in tracker.tracker_notes)
    with pytest.raises(ValueError, match="report.source"):
        gather([run_dir], source="nope")

    cfg = compose_pipeline("tracking=wandb", f"run_dir={run_dir}")
    ctx = StageContext(cfg=cfg, run_dir=run_dir, manifest=m, key="report")
    r = Report(ctx=ctx, data=tracker, out=run_dir / "report")
    md = "\n".join(section_tracking(r))
    rec = m.entry("sft/eksft")["tracking"]
    assert "## Tracking" in md and "`tiny-run-abc`" in md and f"`{rec['run_id']}`" in md and "| sft/eksft |" in md
    assert "wandb sync" in md and r.everything["tracking"]["groups"] == {str(run_dir.resolve()): "tiny-run-abc"}


# -- the split report -------------------------------------------------------------------------------------------
def test_one_split_report_reader(tmp_path):
    from eksft_pipeline.data.schema import DataError
    from eksft_pipeline.data.split import read_split_report

    (tmp_path / "split_report.json").write_text(json.dumps({"generation_prefix": "<think>\n", "n_sft": 3}))
    assert read_split_report(tmp_path) == read_split_report(tmp_path / "split_report.json")
    assert read_split_report(tmp_path)["generation_prefix"] == "<think>\n"  # later stages read ctx.run_format
    with pytest.raises(DataError, match="split report not found: .*nope.json; run the split stage"):
        read_split_report(tmp_path / "nope.json")
    # no stage parses split_report.json itself any more
    pkg = Path(runner.__file__).resolve().parents[1]
    offenders = [str(p) for p in pkg.rglob("*.py") if '["report"]).read_text' in p.read_text()]
    assert not offenders, offenders
