"""The run's format, resolved once: chat template, EOS / stop tokens, generation prefix, model directories.

The split stage (data/stage.py `SplitStage`, and the tool-use task's `ToolSplitStage`) resolves the format from the
config and the tokenizer ONCE and writes it to `<run_dir>/split/run_format.json` (its manifest output
`run_format`). Every later stage reads it through ONE accessor, `ctx.run_format` (contract/stage_api.py): no stage
resolves the chat template or the model directory again, and the generation prefix has one source.

This module is also the one place that resolves a template spec (`model.chat_template`: a name in `TEMPLATES`, a
`.jinja` file or Jinja text) and a model reference (`resolve_model`, over models/hub.py `resolve_model_dir`):
`tests/contract/test_run_format.py` greps the package for other callers.

Before the split has completed there is no record (a dry run; a base model evaluated in a run directory of its
own): `ctx.run_format` then answers the format planned from the config by the same function (`planned=True`: the
template and prefix as the split would write them, no model directory, no EOS check). A completed split's record
that is missing or corrupt is an error naming the file and the fix (one line).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from eksft_pipeline.chatml import CHATML
from eksft_pipeline.contract.errors import ConfigError, PipelineError

RUN_FORMAT_FILE = "run_format.json"
RUN_FORMAT_OUTPUT = "run_format"  # the split stage's manifest output naming the record
VERSION = 1

TEMPLATES: dict[str, str] = {"chatml": CHATML}

# split.think_prefix: keep "<think>\n" in the SFT target, move it into the generation prompt, or drop it
THINK_PREFIX = "<think>\n"
THINK_PREFIX_MODES = ("keep", "prompt", "strip")


class ChatTemplateError(ValueError):
    """The configured chat template or EOS cannot be used; the message names the setting to change."""


class RunFormatError(PipelineError):
    """The run-format record is missing or unreadable; the message names the file and the stage to rerun."""


def resolve_template(spec: str | None) -> str | None:
    """Template text for ``model.chat_template``: a name in :data:`TEMPLATES`, a ``.jinja`` file, or Jinja text.

    ``None`` / ``""`` -> ``None`` (keep the tokenizer's own template).
    """
    if spec in (None, ""):
        return None
    spec = str(spec)
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.suffix == ".jinja":
        if not path.is_file():
            raise ChatTemplateError(f"model.chat_template: template file {path} not found")
        return path.read_text()
    raise ChatTemplateError(
        f"model.chat_template={spec!r} is neither a known template ({', '.join(sorted(TEMPLATES))}), "
        "a .jinja file, nor Jinja text"
    )


def template_name(spec: str | None) -> str:
    """Short label for reports: the template's name, the file name, or 'inline'/'tokenizer'."""
    if spec in (None, ""):
        return "tokenizer"
    spec = str(spec)
    if spec in TEMPLATES:
        return spec
    return Path(spec).name if spec.endswith(".jinja") else "inline"


def generation_prefix_for(mode: str) -> str:
    """The text later stages must append after the rendered generation prompt for ``split.think_prefix=mode``."""
    if mode not in THINK_PREFIX_MODES:
        raise ConfigError(f"unknown think_prefix mode {mode!r} (expected one of {list(THINK_PREFIX_MODES)})")
    return THINK_PREFIX if mode == "prompt" else ""


def resolve_model(ref: str, *, revision: str | None = None) -> Path:
    """A local directory for a model reference (the path, or its snapshot in the HF cache; never downloads).
    The package's one caller of models/hub.py `resolve_model_dir` outside models/."""
    from eksft_pipeline.models.hub import resolve_model_dir

    return resolve_model_dir(ref, revision=revision)


@dataclass(frozen=True)
class RunFormat:
    """What every stage renders and stops with. Written by the split stage; read with `ctx.run_format`."""

    chat_template_spec: str | None  # model.chat_template as configured (a name, a .jinja path, Jinja text, None)
    chat_template_label: str  # template_name(spec): "chatml", "x.jinja", "inline", "tokenizer"
    chat_template: str | None  # the resolved text; None = the tokenizer's own template
    eos_token: str | None  # model.eos_token (the EOS override the run's tokenizer declares), None = the model's
    generation_prefix: str  # appended after the generation prompt by RL, eval and the case study ("" = none)
    think_prefix: str  # split.think_prefix the prefix comes from
    model_ref: str  # model.path as configured (hub name or directory)
    model_dir: str | None = None  # its local directory, resolved by the split (None: not resolvable then)
    tokenizer_dir: str | None = None  # the split's run tokenizer (template + EOS applied), None when not written
    eos: dict[str, Any] | None = None  # the split's EOS check: end_of_turn(_id), stop_token_ids, stop_tokens
    planned: bool = field(default=False, compare=False)  # True: from the config on a dry run, not the record

    @property
    def template_or_empty(self) -> str:
        """The resolved template text, "" for the tokenizer's own (what eval's SamplingParams carries)."""
        return self.chat_template or ""

    def base_model_dir(self) -> Path:
        """The base model's local directory: the recorded one, else resolved now (a hub model cached after the
        split, e.g. by verl's download during SFT)."""
        if self.model_dir and Path(self.model_dir).is_dir():
            return Path(self.model_dir)
        return resolve_model(self.model_ref)

    def model_dir_of(self, ref: str) -> Path:
        """A local directory for `ref`: the base model's for `model.path`, the path itself for a directory."""
        if str(ref) == self.model_ref:
            return self.base_model_dir()
        return resolve_model(str(ref))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("planned")
        return {"version": VERSION, **d}


def run_format_from_config(cfg, *, resolve_dir: bool = False, tokenizer_dir: str | None = None,
                           eos: dict | None = None, planned: bool = False) -> RunFormat:
    """The run's format as the config states it (the split adds the tokenizer dir and its EOS check)."""
    m = cfg.model
    spec = m.get("chat_template")
    spec = None if spec in (None, "") else str(spec)
    split = cfg.get("split")
    think = str(split.get("think_prefix", "keep")) if split is not None else "keep"
    model_dir = None
    if resolve_dir:
        try:
            model_dir = str(resolve_model(str(m.path)))
        except FileNotFoundError:
            model_dir = None  # a hub model not cached yet: resolved when a stage needs it (base_model_dir)
    return RunFormat(
        chat_template_spec=spec,
        chat_template_label=template_name(spec),
        chat_template=resolve_template(spec),
        eos_token=None if m.get("eos_token") in (None, "") else str(m.get("eos_token")),
        generation_prefix=generation_prefix_for(think),
        think_prefix=think,
        model_ref=str(m.path),
        model_dir=model_dir,
        tokenizer_dir=tokenizer_dir,
        eos=eos,
        planned=planned,
    )


def write_run_format(out_dir: str | Path, fmt: RunFormat) -> Path:
    """Write the record (atomically: a reader never sees half of it) to `out_dir/run_format.json`."""
    path = Path(out_dir) / RUN_FORMAT_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(fmt.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_run_format(path: str | Path) -> RunFormat:
    """The record at `path`; RunFormatError (one line, naming the file and the fix) when missing or corrupt."""
    path = Path(path)
    fix = "rerun the split stage (stage=split force=true)"
    if not path.is_file():
        raise RunFormatError(f"run format record {path} is missing; {fix}")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFormatError(f"run format record {path} is not readable JSON ({type(e).__name__}); {fix}") from None
    if not isinstance(d, dict) or d.get("version") != VERSION:
        got = d.get("version") if isinstance(d, dict) else type(d).__name__
        raise RunFormatError(f"run format record {path} has version {got!r}, expected {VERSION}; {fix}")
    names = {f.name for f in fields(RunFormat)} - {"planned"}
    missing = sorted(n for n in names if n not in d)
    if missing:
        raise RunFormatError(f"run format record {path} lacks {', '.join(missing)}; {fix}")
    str_keys = ("chat_template_label", "generation_prefix", "think_prefix", "model_ref")
    bad = [k for k in str_keys if not isinstance(d[k], str)]
    bad += [k for k in ("chat_template_spec", "chat_template", "eos_token", "model_dir", "tokenizer_dir")
            if d[k] is not None and not isinstance(d[k], str)]
    if d["eos"] is not None and not isinstance(d["eos"], dict):
        bad.append("eos")
    if bad:
        raise RunFormatError(f"run format record {path} has a wrong type for {', '.join(sorted(bad))}; {fix}")
    return RunFormat(**{n: d[n] for n in names})


__all__ = ["CHATML", "RUN_FORMAT_FILE", "RUN_FORMAT_OUTPUT", "TEMPLATES", "THINK_PREFIX", "THINK_PREFIX_MODES",
           "ChatTemplateError", "RunFormat", "RunFormatError", "generation_prefix_for", "read_run_format",
           "resolve_model", "resolve_template", "run_format_from_config", "template_name", "write_run_format"]
