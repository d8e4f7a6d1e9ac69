"""Tracking identity, mode and the W&B transaction-log reader (real wandb, offline, no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eksft_pipeline.contract import tracking as T

REPO = Path(__file__).resolve().parents[2]


def _settings(**kw):
    return T.settings_from_config(OmegaConf.create({"tracking": kw}))


def test_settings_reject_unknown_backends_and_modes():
    assert not T.settings_from_config(OmegaConf.create({})).enabled
    assert _settings(backends=["wandb", "tensorboard"]).backends == ("wandb", "tensorboard")
    with pytest.raises(ValueError, match=r"unknown backend\(s\) \['wandbb'\].*supported: wandb"):
        _settings(backends=["wandbb"])
    with pytest.raises(ValueError, match="tracking.mode"):
        _settings(backends=["wandb"], mode="cloud")


def test_mode_env_wins_then_setting_then_credentials(tmp_path):
    s = _settings(backends=["wandb"])
    home = {"HOME": str(tmp_path)}
    assert T.wandb_mode(s, home) == "offline"  # no key, no netrc
    assert T.wandb_mode(s, home | {"WANDB_API_KEY": "k" * 40}) == "online"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n")
    os.chmod(tmp_path / ".netrc", 0o600)
    assert T.wandb_mode(s, home) == "online"
    assert T.wandb_mode(s, home | {"WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"
    assert T.wandb_mode(_settings(backends=["wandb"], mode="disabled"), home) == "disabled"
    assert T.wandb_mode(s, home | {"WANDB_MODE": "dryrun"}) == "offline"
    assert T.wandb_mode(_settings(backends=["wandb"], mode="online"), home | {"WANDB_MODE": "offline"}) == "offline"


def _ident(previous, h="sha256:a", backends=("wandb",)):
    return T.identity_for(
        T.TrackingSettings(backends=backends), stage_key="sft/eksft", run_dir=Path("/r"), group="g",
        previous=previous, config_hash=h, environ={"HOME": "/nonexistent"},
    )  # fmt: skip


def test_run_id_is_reused_only_by_a_resume_of_the_same_config():
    first = _ident(None)
    assert first.run_id.startswith("sft-eksft-") and not first.resumed and first.name == "sft/eksft"
    rec = {"tracking": first.record(Path("/r")), "config_hash": "sha256:a"}
    # killed / failed attempt of the same config: continue the tracker run
    for status in ("running", "failed", "killed"):
        again = _ident(rec | {"status": status})
        assert again.run_id == first.run_id and again.resumed
    # changed config, or a forced re-run of a complete stage: a new tracker run
    assert _ident(rec | {"status": "failed"}, h="sha256:b").run_id != first.run_id
    assert _ident(rec | {"status": "complete"}).run_id != first.run_id
    # different backends: new run
    assert _ident(rec | {"status": "failed"}, backends=("wandb", "tensorboard")).run_id != first.run_id
    assert T.identity_for(T.TrackingSettings(), stage_key="x", run_dir=Path("/r"), group="g", previous=None,
                          config_hash="h") is None


def test_verl_logger_and_env(tmp_path):
    ident = T.identity_for(T.TrackingSettings(backends=("wandb", "tensorboard"), entity="lab"), stage_key="rl/eksft",
                           run_dir=tmp_path, group="grp", previous=None, config_hash="h",
                           environ={"HOME": str(tmp_path)})
    assert T.verl_logger(["console", "file"], ident) == ["console", "file", "wandb", "tensorboard"]
    assert T.verl_logger(["console", "file"], None) == ["console", "file"]
    env = T.verl_env(ident)
    assert env["WANDB_RUN_GROUP"] == "grp" and env["WANDB_RUN_ID"] == ident.run_id
    assert env["WANDB_NAME"] == "rl/eksft" and env["WANDB_RESUME"] == "allow" and env["WANDB_MODE"] == "offline"
    assert env["WANDB_ENTITY"] == "lab" and env["WANDB_JOB_TYPE"] == "rl"
    assert Path(env["TENSORBOARD_DIR"]).is_dir() and Path(env["WANDB_DIR"]) == tmp_path / "tracking"
    rec = ident.record(tmp_path)
    assert rec["dirs"] == {"wandb": "tracking", "tensorboard": f"tracking/tensorboard/{ident.run_id}"}


def test_offline_runs_resume_into_one_history_readable_from_the_files(tmp_path):
    """Two processes log to one run id (a killed stage and its resume); the reader merges both
    attempts' local folders, and the run record carries the group, name and job type."""
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from eksft_pipeline.contract import tracking as T
        ident = T.RunIdentity(backends=("wandb",), project="p", group="grp", name="eval/eksft", run_id="eval-x1",
                              job_type="eval", mode="offline", dirs={"wandb": sys.argv[1]})
        start = int(sys.argv[2])
        with T.StageRun(ident, config={"n": 4}) as run:
            for step in range(start, start + 3):
                run.log({"acc": step / 10, "label": "text is skipped"}, step=step)
        """
    )
    root = tmp_path / "tracking"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    for start in (0, 3):
        subprocess.run([sys.executable, "-c", script, str(root), str(start)], check=True, env=env, timeout=180)
    dirs = T.wandb_run_dirs(root, "eval-x1")
    assert len(dirs) == 2 and all(d.name.startswith("offline-run-") for d in dirs)
    info = T.read_wandb_run_info(dirs[0])
    assert info == {"run_id": "eval-x1", "name": "eval/eksft", "group": "grp", "job_type": "eval", "project": "p"}
    hist = T.history({"backends": ["wandb"], "run_id": "eval-x1", "dirs": {"wandb": "tracking"}}, tmp_path)
    assert sorted(hist) == list(range(6))
    assert [hist[s]["acc"] for s in range(6)] == pytest.approx([s / 10 for s in range(6)])
    assert "label" not in hist[0]


def test_run_folders_of_one_id_in_time_order_and_not_a_child_runs(tmp_path):
    """Two attempts in the same second get two folders (StageRun's nanosecond suffix) and both are found, in
    start order; a child run `<id>-sub` and a folder without the run's log are not `<id>`'s."""
    base = tmp_path / "wandb"
    made = {
        "offline-run-20261206_185551-x1-1796583351000000002": "x1",
        "offline-run-20261206_185551-x1-1796583351900000000": "x1",
        "offline-run-20261206_185549-x1": "x1",  # verl's own wandb.init: no suffix
        "offline-run-20261206_185551-x1-sub": "x1-sub",
        "offline-run-20261206_185552-x1-empty": None,
    }
    for name, rid in made.items():
        (base / name).mkdir(parents=True)
        if rid:
            (base / name / f"run-{rid}.wandb").write_bytes(b":W&B")
    assert [d.name for d in T.wandb_run_dirs(tmp_path, "x1")] == [
        "offline-run-20261206_185549-x1",
        "offline-run-20261206_185551-x1-1796583351000000002",
        "offline-run-20261206_185551-x1-1796583351900000000",
    ]
    assert [d.name for d in T.wandb_run_dirs(tmp_path, "x1-sub")] == ["offline-run-20261206_185551-x1-sub"]


def test_reader_rejects_other_files_and_handles_records_across_blocks(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a log")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        list(T._wandb_records(bad))
    # a hand-made log: one FULL record, then one record split FIRST/LAST across the 32 KiB block edge
    import struct

    def chunk(kind, data):
        return struct.pack("<IHB", 0, len(data), kind) + data

    head = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    a = b"A" * 100
    body = head + chunk(1, a)
    room = 32768 - len(body) - 7
    b1, b2 = b"B" * room, b"C" * 50
    body += chunk(2, b1) + chunk(4, b2) + chunk(1, b"D")
    (tmp_path / "run-y.wandb").write_bytes(body)
    assert list(T._wandb_records(tmp_path / "run-y.wandb")) == [a, b1 + b2, b"D"]
