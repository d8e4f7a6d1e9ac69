"""The manifest: relative paths (a copied run dir is its own), content hashes, stale downstream entries,
atomic writes with a backup, and failures that a full disk cannot hide."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from eksft_pipeline.contract import manifest as mf
from eksft_pipeline.contract.manifest import Manifest


def _stage(run: Path, key: str, files: dict[str, str], inputs: dict[str, str] | None = None) -> dict[str, str]:
    """Record a complete stage `key` whose outputs are `files` (name -> relative path, written here)."""
    m = Manifest(run)
    outs = {}
    for name, rel in files.items():
        p = run / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"{key}:{name}")
        outs[name] = str(p)
    m.start(key, {"k": key}, f"h-{key}", inputs or {})
    m.complete(key, outs)
    return outs


def test_paths_are_relative_and_a_copied_run_dir_is_its_own(tmp_path):
    run = tmp_path / "run"
    outs = _stage(run, "sft/x", {"model": "sft/x/hf_model/w.bin", "metrics": "sft/x/metrics.json"})
    # a directory output
    m = Manifest(run)
    m.start("rl/x", {}, "h-rl", {"model": outs["model"], "outside": str(tmp_path)})
    (run / "rl" / "x" / "hf").mkdir(parents=True)
    (run / "rl" / "x" / "hf" / "w.bin").write_bytes(b"w")
    m.complete("rl/x", {"hf_model": str(run / "rl" / "x" / "hf")})
    raw = json.loads((run / "manifest.json").read_text())["stages"]
    assert raw["sft/x"]["outputs"]["model"]["path"] == "sft/x/hf_model/w.bin"
    assert raw["rl/x"]["inputs"]["model"]["path"] == "sft/x/hf_model/w.bin"
    assert raw["rl/x"]["inputs"]["outside"]["path"] == str(tmp_path)  # outside the run dir: absolute
    assert m.outputs("rl/x") == {"hf_model": str(run / "rl" / "x" / "hf")}

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)  # new inodes and mtimes: content hashes must still match
    for f in copy.rglob("*"):
        f.touch()
    mc = Manifest(copy)
    assert mc.is_complete("rl/x", "h-rl") == (True, "complete")
    assert mc.outputs("sft/x")["model"] == str(copy / "sft" / "x" / "hf_model" / "w.bin")
    shutil.rmtree(copy / "rl")
    done, why = mc.is_complete("rl/x", "h-rl")
    assert not done and str(copy / "rl" / "x" / "hf") in why  # the copy's own folder, not the original's
    assert Manifest(run).is_complete("rl/x", "h-rl")[0]  # the original is untouched


def test_content_change_with_same_size_is_detected(tmp_path):
    run = tmp_path / "run"
    _stage(run, "split", {"train": "split/train.txt"})
    (run / "split" / "train.txt").write_text("split:traiX")  # same size, new content
    done, why = Manifest(run).is_complete("split", "h-split")
    assert not done and "changed on disk" in why


def test_restart_marks_consumers_stale_transitively(tmp_path):
    run = tmp_path / "run"
    split = _stage(run, "split", {"sft": "split/sft.parquet", "rl": "split/rl.parquet"})
    sft = _stage(run, "sft/a", {"hf": "sft/a/hf_model"}, {"train": split["sft"]})
    _stage(run, "handoff/a", {"report": "handoff/a/r.json"}, {"init": sft["hf"]})
    _stage(run, "eval/a", {"m": "eval/a/m.json"}, {"model_sft": sft["hf"]})
    _stage(run, "sft/b", {"hf": "sft/b/hf_model"}, {"train": split["sft"]})
    _stage(run, "report", {"md": "report/report.md"}, {"x": str(run / "eval/a/m.json")})
    m = Manifest(run)
    stale = m.start("sft/a", {"k": "sft/a", "lr": 2}, "h-new", {"train": split["sft"]})
    assert sorted(stale) == ["eval/a", "handoff/a", "report"]
    st = m.read()["stages"]
    assert st["sft/b"]["status"] == "complete" and st["split"]["status"] == "complete"
    assert st["eval/a"]["status"] == "stale" and "upstream sft/a re-ran" in st["eval/a"]["stale_reason"]
    with pytest.raises(FileNotFoundError, match="eval/a.*stale.*run it first"):
        m.outputs("eval/a")
    assert m.is_complete("report", "h-report")[0] is False


def test_a_handoff_that_only_points_at_the_sft_model_does_not_stale_the_sft_consumers(tmp_path):
    run = tmp_path / "run"
    sft = _stage(run, "sft/a", {"hf": "sft/a/hf_model"})
    m = Manifest(run)
    m.start("handoff/a", {}, "h", {"init": sft["hf"]})
    m.complete("handoff/a", {"model": sft["hf"], "report": str(_write(run / "handoff/a/r.json"))})
    _stage(run, "rl/a", {"hf": "rl/a/hf"}, {"model": sft["hf"]})
    assert m.start("handoff/a", {}, "h", {"init": sft["hf"]}) == []  # rl/a used the SFT model, not the handoff's files


def _write(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("{}")
    return p


def test_unreadable_manifest_falls_back_to_its_backup_and_tmp_leftovers_are_ignored(tmp_path, capsys):
    run = tmp_path / "run"
    _stage(run, "split", {"train": "split/train.txt"})
    _stage(run, "sft/a", {"hf": "sft/a/w"})
    # a killed writer's half-written temporary: never read, removed by the next write
    (run / "manifest.json.tmp").write_text('{"stages": {"spl')
    (run / "manifest.json.99999999.tmp").write_text("{")
    m = Manifest(run)
    assert set(m.read()["stages"]) == {"split", "sft/a"}
    (run / "manifest.json").write_text('{"version": 2, "stages": {"split": {"sta')  # damaged in place
    assert set(m.read()["stages"]) >= {"split"}  # from manifest.json.bak
    assert "unreadable" in capsys.readouterr().out
    m.update("split", note="x")
    assert not list(run.glob("manifest.json*.tmp"))
    assert json.loads((run / "manifest.json").read_text())["stages"]["split"]["note"] == "x"
    (run / "manifest.json").write_text("{")
    (run / "manifest.json.bak").write_text("{")
    with pytest.raises(RuntimeError, match=r"unreadable .* move both away"):
        m.read()


def test_large_files_are_hashed_once_per_inode(tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "CACHE_MIN_BYTES", 10)
    calls = []
    real = mf._sha256_file
    monkeypatch.setattr(mf, "_sha256_file", lambda p: calls.append(p) or real(p))
    run = tmp_path / "run"
    big = run / "sft" / "w.bin"
    big.parent.mkdir(parents=True)
    big.write_bytes(b"x" * 100)
    m = Manifest(run)
    h1 = m.hash(big)
    assert Manifest(run).hash(big) == h1 and len(calls) == 1  # second lookup from .hash_cache.json
    big.write_bytes(b"y" * 100)  # rewritten: new mtime/ctime -> hashed again
    assert m.hash(big) != h1 and len(calls) == 2


def test_manifest_write_failure_never_hides_the_original_error(tmp_path, monkeypatch, capsys):
    """ENOSPC while recording a failure (simulated; test_faults.py fills a real tmpfs): the stage's own error
    is what the user sees, with the manifest problem named next to it."""
    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.orchestrator import runner

    run = tmp_path / "run"
    m = Manifest(run)
    m.start("split", {}, "h", {})

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(Manifest, "_write", full)
    original = ValueError("split.n_sft=999 exceeds the 10 valid rows; lower it")
    runner._record_failure(original, "split", m, None)
    assert original.manifest_error.errno == errno.ENOSPC
    original.stage_key = "split"
    code = runner.report_error(original, compose_pipeline(f"run_dir={run}"))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert code == 2
    assert lines[-1].startswith("[eksft-pipeline] error: split: split.n_sft=999 exceeds the 10 valid rows; lower it")
    assert "manifest could not record this failure" in lines[-1] and "No space left" in lines[-1]


def test_stale_entries_are_current_again_when_the_rerun_reproduces_its_files(tmp_path):
    run = tmp_path / "run"
    split = _stage(run, "split", {"sft": "split/sft.parquet"})
    _stage(run, "sft/a", {"hf": "sft/a/hf_model"}, {"train": split["sft"]})
    m = Manifest(run)
    m.start("split", {"k": "split"}, "h-split", {})
    assert m.entry("sft/a")["status"] == "stale"
    assert m.complete("split", split) == ["sft/a"]  # same bytes (a deterministic split): sft/a is current
    assert m.entry("sft/a")["status"] == "complete" and "stale_reason" not in m.entry("sft/a")
    m.start("split", {"k": "split"}, "h-split", {})
    Path(split["sft"]).write_text("different rows")
    assert m.complete("split", split) == []
    assert m.entry("sft/a")["status"] == "stale"
