"""Stage `split` of `task=tool_use` (registry name `tool_split`): ACEBench (or the tiny twin) -> SFT rows with tools.

    python -m eksft_pipeline task=tool_use stage=split model=qwen3-8b task.data.source=/data/ACEBench/data_all
    python -m eksft_pipeline task=tool_use stage=split                  # tiny: the generated twin (data/tool_use/tiny.py)

Same manifest key and outputs as the maths split (`split`: `sft_train`, `tokenizer`, `report`, `dropped`), so
the SFT stage trains on it unchanged; it writes no RL split (`task=tool_use` runs no RL: the paper trains the
tool-use models with SFT only, App. I). The run's tokenizer (template + EOS, EOS-checked) is made exactly as the
maths split makes it, and rows longer than `model.data.cutoff_tokens` under that template are dropped
(`over_length`). `task.data.source: tiny` generates the CPU twin (training rows in ACEBench's layout, held-out
eval entries in BFCL's layout, output `bfcl_eval_dir` for the eval stage) under `<run_dir>/split/tiny_tool_data`.
The run tokenizer carries `<tool_call>` / `</tool_call>` as added tokens, as Qwen3's does
(`format.add_tool_call_tokens`: a no-op for Qwen3; the tiny tokenizer gets them in the model's spare rows), and
with `task.data.format_tokens: true` (the tiny recipe) the twin's fixed tool-format strings
(`format.add_twin_format_tokens`, a departure documented there).
"""

from __future__ import annotations

from pathlib import Path

from eksft_pipeline.contract.recipes import plain
from eksft_pipeline.contract.run_format import RUN_FORMAT_FILE, run_format_from_config
from eksft_pipeline.contract.stage_api import ConfigError, StageContext, StageResult, positive
from eksft_pipeline.data.stage import SplitStage

TINY = "tiny"


class ToolSplitStage(SplitStage):
    name = "split"

    def config(self, cfg):
        return {"task": str(cfg.task.name), "data": plain(cfg.task.data), "seed": int(cfg.seed),
                "cutoff_tokens": int(cfg.model.data.cutoff_tokens), "tokenizer": str(cfg.model.path),
                "chat_template": run_format_from_config(cfg).chat_template,
                "eos_token": cfg.model.get("eos_token")}  # fmt: skip

    def inputs(self, ctx):
        src = str(ctx.cfg.task.data.source)
        inp = {"source": src} if src != TINY and Path(src).exists() else {}
        if Path(str(ctx.cfg.model.path)).exists():
            inp["tokenizer"] = str(ctx.cfg.model.path)
        return inp

    def check(self, ctx):
        from eksft_pipeline.data.tool_use.acebench import LANGS

        d = ctx.cfg.task.data
        src = "" if d.get("source") is None else str(d.source)
        if not src and not ctx.dry_run:  # a dry run shows the stages without it (describe prints source: null)
            raise ConfigError("task.data.source is empty: set it to an ACEBench data_all folder "
                              "(github.com/chenchen0103/ACEBench) or 'tiny' for the generated CPU twin")
        if src != TINY and not ctx.dry_run and not Path(src).expanduser().exists():
            raise ConfigError(f"task.data.source={src} does not exist; pass the ACEBench folder holding data_en/")
        langs = list(d.langs)
        if not langs or any(x not in LANGS for x in langs):
            raise ConfigError(f"task.data.langs={langs} must be a non-empty subset of {list(LANGS)}")
        positive(d, "n_sft", "task.data", allow_none=True)
        positive(ctx.cfg.model.data, "cutoff_tokens", "model.data")
        if str(ctx.cfg.split.think_prefix) != "keep":
            raise ConfigError("task=tool_use: split.think_prefix must stay 'keep' (tool targets have no <think>)")

    def describe(self, ctx):
        m = ctx.cfg.model
        return {"stage": "split", "task": "tool_use", "out_dir": str(ctx.out_dir), "tokenizer": str(m.path),
                "chat_template": run_format_from_config(ctx.cfg).chat_template_label,
                "cutoff_tokens": int(m.data.cutoff_tokens), "run_tokenizer": str(ctx.out_dir / "tokenizer"),
                "run_format": str(ctx.out_dir / RUN_FORMAT_FILE), **plain(ctx.cfg.task.data)}  # fmt: skip

    def run(self, ctx: StageContext) -> StageResult:
        from eksft_pipeline.data.tool_use.acebench import split_acebench
        from eksft_pipeline.data.tool_use.format import add_tool_call_tokens, add_twin_format_tokens
        from eksft_pipeline.data.tool_use.tiny import make_tiny_tool_data

        d = ctx.cfg.task.data
        out = Path(ctx.out_dir)
        tok, eos, fmt = self.run_tokenizer(ctx)
        rows = _model_vocab_size(str(fmt.model_ref), len(tok))
        added = add_tool_call_tokens(tok, rows)
        if added:
            print(f"[split] tool_use: run tokenizer gets {added} as added tokens (as Qwen3's tokenizer has them)",
                  flush=True)
        n_format = len(add_twin_format_tokens(tok, rows)) if d.get("format_tokens") else 0
        if n_format:
            print(f"[split] tool_use: run tokenizer gets the twin's tool-format tokens ({len(tok)} tokens)", flush=True)
        outputs = self.save_run_format(ctx, tok, eos, fmt)
        src = str(d.source)
        if src == TINY:
            paths = make_tiny_tool_data(out / "tiny_tool_data", **(plain(d.get("tiny")) or {}))
            src = paths["acebench"]
            outputs["bfcl_eval_dir"] = paths["bfcl"]
        rep = split_acebench(src, out, langs=list(d.langs), n_sft=None if d.get("n_sft") is None else int(d.n_sft),
                             seed=int(ctx.cfg.seed), tokenizer=tok, cutoff_tokens=int(ctx.cfg.model.data.cutoff_tokens))
        print(f"[split] tool_use: {rep['n_input']} ACEBench rows -> sft {rep['n_sft']}, dropped {rep['n_dropped']} "
              f"{ {k: v for k, v in rep['dropped'].items() if v} } -> {out}", flush=True)
        outputs.update({"sft_train": str(out / rep["files"]["sft"]), "report": str(out / "split_report.json"),
                        "dropped": str(out / rep["files"]["dropped"])})  # fmt: skip
        return StageResult(outputs=outputs, summary={**{k: rep[k] for k in ("n_input", "n_valid", "n_sft",
                                                                           "n_dropped", "dropped")},
                                                     "eos": eos, "length_check": rep["length_check"],
                                                     "added_tokens": added, "format_tokens": n_format})  # fmt: skip


def _model_vocab_size(model_path: str, default: int) -> int:
    """The model's embedding rows (``vocab_size`` of its config.json), or ``default`` (no room to add tokens)."""
    import json

    try:
        return int(json.loads((Path(model_path) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return default
