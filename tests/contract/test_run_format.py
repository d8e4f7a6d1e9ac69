"""The run's format, resolved once (issue 27 item 3): contract/run_format.py and `ctx.run_format`.

The split writes `<run_dir>/split/run_format.json`; a later stage refuses a missing or corrupt record with a one-line
error naming the file; the template, the generation prefix and the model directory are resolved in one module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eksft_pipeline.chatml import CHATML
from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.contract.run_format import (
    RUN_FORMAT_OUTPUT,
    RunFormatError,
    read_run_format,
    run_format_from_config,
    write_run_format,
)
from eksft_pipeline.contract.stage_api import StageContext

PKG = Path(__file__).resolve().parents[2] / "eksft_pipeline"


def _ctx(tmp_path: Path, *overrides: str, dry_run: bool = False) -> StageContext:
    cfg = compose_pipeline("model=tiny", f"run_dir={tmp_path}", *overrides)
    return StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key="rl/eksft", dry_run=dry_run)


def _complete_split(tmp_path: Path, outputs: dict[str, str]) -> None:
    m = Manifest(tmp_path)
    m.start("split", config={}, cfg_hash="h", inputs={})
    m.complete("split", outputs=outputs, summary={})


def test_the_record_round_trips_and_the_prefix_follows_think_prefix(tmp_path):
    cfg = compose_pipeline("model=tiny", "split.think_prefix=prompt")
    fmt = run_format_from_config(cfg)
    assert (fmt.chat_template, fmt.chat_template_label, fmt.generation_prefix) == (CHATML, "chatml", "<think>\n")
    path = write_run_format(tmp_path, fmt)
    assert read_run_format(path) == fmt
    assert run_format_from_config(compose_pipeline("model=tiny")).generation_prefix == ""


def test_a_stage_reads_the_split_record_through_ctx_run_format(tmp_path):
    """The stage takes the record's values, not the config's: a record whose prefix differs is what it sees."""
    ctx = _ctx(tmp_path)
    rec = tmp_path / "split" / "run_format.json"
    rec.parent.mkdir()
    rec.write_text(json.dumps(run_format_from_config(ctx.cfg).to_dict() | {"generation_prefix": "PFX"}))
    _complete_split(tmp_path, {RUN_FORMAT_OUTPUT: str(rec)})
    assert ctx.run_format.generation_prefix == "PFX" and not ctx.run_format.planned


def test_without_a_completed_split_the_format_is_planned_from_the_config(tmp_path):
    """A dry run, or a base model evaluated in a run directory with no split: the config's format, marked planned."""
    for dry in (True, False):
        fmt = _ctx(tmp_path, "split.think_prefix=prompt", dry_run=dry).run_format
        assert fmt.planned and fmt.chat_template == CHATML and fmt.generation_prefix == "<think>\n"


def _one_line_error(ctx) -> str:
    with pytest.raises(RunFormatError) as e:
        ctx.run_format  # noqa: B018 - the property is what is tested
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_missing_record_is_refused_in_one_line(tmp_path):
    (tmp_path / "split_report.json").write_text("{}")
    _complete_split(tmp_path, {"report": str(tmp_path / "split_report.json")})  # a split from before the record
    assert re.fullmatch(r"the split stage in \S+ recorded no run_format \(it ran before the record existed\); rerun "
                        r"the split stage \(stage=split force=true\)", _one_line_error(_ctx(tmp_path)))
    rec = tmp_path / "split" / "run_format.json"
    rec.parent.mkdir()
    rec.write_text(json.dumps(run_format_from_config(compose_pipeline("model=tiny")).to_dict()))
    _complete_split(tmp_path, {RUN_FORMAT_OUTPUT: str(rec)})
    rec.unlink()  # recorded, then deleted
    assert f"run format record {rec} is missing" in _one_line_error(_ctx(tmp_path))


@pytest.mark.parametrize("text, what", [
    ("{not json", "not readable JSON"),
    (json.dumps({"version": 99}), "has version 99"),
    (json.dumps({"version": 1, "chat_template": None}), "lacks"),
])
def test_a_corrupt_record_is_refused_in_one_line_naming_the_file(tmp_path, text, what):
    rec = tmp_path / "split" / "run_format.json"
    rec.parent.mkdir()
    rec.write_text(text)
    _complete_split(tmp_path, {RUN_FORMAT_OUTPUT: str(rec)})
    msg = _one_line_error(_ctx(tmp_path))
    assert what in msg and str(rec) in msg and "stage=split" in msg


def test_a_record_with_a_wrong_type_is_refused(tmp_path):
    d = run_format_from_config(compose_pipeline("model=tiny")).to_dict() | {"generation_prefix": 3}
    rec = tmp_path / "run_format.json"
    rec.write_text(json.dumps(d))
    with pytest.raises(RunFormatError, match="wrong type for generation_prefix"):
        read_run_format(rec)


def _callers(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.M)
    return sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if rx.search(p.read_text()))


def test_the_model_dir_and_the_template_are_resolved_in_one_place():
    """No stage resolves the model or the template again: models/hub.py defines `resolve_model_dir` (and pins a
    revision with it), contract/run_format.py is its one other caller and the one resolver of a template spec; the
    generation prefix is derived there only (`generation_prefix_for`) and nothing reads it from the split report."""
    assert _callers(r"\bresolve_model_dir\(") == ["contract/run_format.py", "models/hub.py"]
    assert _callers(r"\bresolve_template\(") == ["contract/run_format.py"]
    assert _callers(r"\bgeneration_prefix_for\(") == ["contract/run_format.py", "data/split.py"]
    assert _callers(r"TEMPLATES\[") == ["contract/run_format.py"]
    assert not _callers(r"\.get\(\s*[\"']generation_prefix[\"']"), "the prefix read from a report dict"
    assert not _callers(r"\bgeneration_prefix\(\s*read_split_report"), "the prefix read from the split report"


def test_one_plain_helper():
    assert _callers(r"^def _plain\(|^def _to_plain\(") == []
