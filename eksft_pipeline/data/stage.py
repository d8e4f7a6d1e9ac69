"""Stages `assets` and `split`.

    python -m eksft_pipeline stage=assets            # tiny model + tokenizer + generated data (CPU default)
    python -m eksft_pipeline stage=split             # OpenR1-Math -> disjoint SFT / RL parquet files
    python -m eksft_pipeline stage=split model=qwen3-8b split.source=/data/openr1.parquet

`assets` builds the embedded CPU default (model.kind=tiny) with `eksft_pipeline.data.tiny_assets.
make_tiny_assets` (idempotent, no download); for a hub/local model (model.kind=hf) it only records
which model the run uses. `split` loads the model's tokenizer, sets the run's chat template and EOS on it
(`model.chat_template`, `model.eos_token`; eksft_pipeline/data/chat_template.py), checks that the token ending
every SFT target is a stop token of RL and eval (before any GPU time is spent on SFT), writes that tokenizer to
`<run_dir>/split/tokenizer/` (the SFT stage trains with it), and calls
`eksft_pipeline.data.split.split_dataset` with it for the length cutoff and token statistics.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from eksft_pipeline.contract.artifacts import atomic_write_json
from eksft_pipeline.contract.recipes import plain
from eksft_pipeline.contract.run_format import (
    RUN_FORMAT_FILE,
    RUN_FORMAT_OUTPUT,
    THINK_PREFIX_MODES,
    run_format_from_config,
    write_run_format,
)
from eksft_pipeline.contract.stage_api import ConfigError, Stage, StageContext, StageResult, positive


class AssetsStage(Stage):
    name = "assets"

    def config(self, cfg):
        return {"model": {"name": cfg.model.name, "kind": cfg.model.kind, "path": str(cfg.model.path),
                          "assets": plain(cfg.model.get("assets"))}}

    def check(self, ctx):
        if str(ctx.cfg.model.kind) not in ("tiny", "hf"):
            raise ConfigError(f"model.kind={ctx.cfg.model.kind!r} must be 'tiny' (built here) or 'hf' (a hub name or "
                              "local directory in model.path); fix the model recipe")

    def validate(self, ctx):
        self.check(ctx)
        if str(ctx.cfg.model.kind) == "tiny":
            import inspect

            from eksft_pipeline.data.tiny_assets import make_tiny_assets

            known = set(inspect.signature(make_tiny_assets).parameters) - {"out_dir"}
            bad = sorted(set(plain(ctx.cfg.model.get("assets")) or {}) - known)
            if bad:
                raise ConfigError(f"model.assets has unknown key(s) {bad}; known: {sorted(known)}")

    def describe(self, ctx):
        cfg = ctx.cfg
        if cfg.model.kind == "tiny":
            return {"stage": "assets", "action": "make_tiny_assets", "out_dir": str(cfg.model.assets_dir),
                    "params": plain(cfg.model.assets)}
        return {"stage": "assets", "action": "record model reference", "model": str(cfg.model.path)}

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        out = ctx.out_dir
        out.mkdir(parents=True, exist_ok=True)
        if cfg.model.kind == "tiny":
            from eksft_pipeline.data.tiny_assets import make_tiny_assets

            params = dict(plain(cfg.model.assets) or {})
            paths = make_tiny_assets(cfg.model.assets_dir, **params)
            for want, key in ((cfg.model.path, "model"), (cfg.model.data.source, "train")):
                if Path(str(want)).resolve() != Path(paths[key]).resolve():
                    raise ValueError(f"model recipe points at {want} but make_tiny_assets wrote {paths[key]}")
            ref = {k: str(v) for k, v in paths.items()}
            atomic_write_json(out / "assets.json", ref, indent=2)
            log = Path(paths["model"]) / "pretrain_log.json"
            summary = json.loads(log.read_text()) if log.exists() else {}
            summary = {k: v for k, v in summary.items() if not isinstance(v, list)}
            return StageResult(
                outputs={"model": str(paths["model"]), "train": str(paths["train"]), "eval": str(paths["eval"]),
                         "assets": str(out / "assets.json")},
                summary=summary,
            )
        if cfg.model.kind != "hf":
            raise ValueError(f"model.kind must be 'tiny' or 'hf', got {cfg.model.kind!r}")
        ref = {"model": str(cfg.model.path), "note": "hub name or local dir, loaded by verl / transformers"}
        # a pinned revision (models/hub.py pin_model_revision): the name, the revision asked and the commit resolved
        ref |= {k: str(cfg.model[k]) for k in ("hub_name", "revision", "revision_resolved") if cfg.model.get(k)}
        atomic_write_json(out / "assets.json", ref, indent=2)
        return StageResult(outputs={"assets": str(out / "assets.json")}, summary=ref)


class SplitStage(Stage):
    name = "split"

    def config(self, cfg):
        fmt = run_format_from_config(cfg)  # the format this stage resolves and records for every later stage
        return {"split": plain(cfg.split), "tokenizer": str(cfg.model.path), "chat_template": fmt.chat_template,
                "eos_token": cfg.model.get("eos_token")}

    def inputs(self, ctx):
        src = str(ctx.cfg.split.source)
        inp = {"source": src} if Path(src).exists() else {}
        if Path(str(ctx.cfg.model.path)).exists():
            inp["tokenizer"] = str(ctx.cfg.model.path)
        return inp

    def check(self, ctx):
        from eksft_pipeline.data.split import _is_hub_name

        s = ctx.cfg.split
        if str(s.think_prefix) not in THINK_PREFIX_MODES:
            raise ConfigError(f"split.think_prefix={s.think_prefix!r} must be one of {list(THINK_PREFIX_MODES)}")
        positive(s, "n_sft", "split")
        positive(s, "n_rl", "split", allow_none=True)
        positive(s, "cutoff_tokens", "split")
        src = str(s.source)
        if not ctx.dry_run and not Path(src).expanduser().exists() and not _is_hub_name(src):
            raise ConfigError(f"split.source={src} does not exist and is not a hub dataset name (owner/name); "
                              "point it at a local parquet/jsonl file or directory")

    def describe(self, ctx):
        m = ctx.cfg.model
        return {"stage": "split", "out_dir": str(ctx.out_dir), "tokenizer": str(m.path),
                "chat_template": run_format_from_config(ctx.cfg).chat_template_label, "eos_token": m.get("eos_token"),
                "run_format": str(ctx.out_dir / RUN_FORMAT_FILE),
                "checks": ["eos: the token ending SFT targets is a stop token of RL/eval (before SFT)"],
                "run_tokenizer": str(ctx.out_dir / "tokenizer"), **plain(ctx.cfg.split)}

    def run_tokenizer(self, ctx: StageContext):
        """The model's tokenizer with the run's chat template and EOS, EOS-checked (see chat_template.py), and the
        run's format (contract/run_format.py) resolved from the config."""
        from transformers import AutoTokenizer

        from eksft_pipeline.data import chat_template as ct

        fmt = run_format_from_config(ctx.cfg, resolve_dir=True)
        tok = AutoTokenizer.from_pretrained(fmt.model_ref)
        ct.apply_template(tok, fmt.chat_template, fmt.eos_token)
        eos = ct.check_eos(tok, fmt.model_ref, generation_prefix=fmt.generation_prefix,
                           template_label=fmt.chat_template_label)
        return tok, eos, fmt

    @staticmethod
    def save_run_format(ctx: StageContext, tok, eos: dict, fmt) -> dict[str, str]:
        """The run's tokenizer and its format record (contract/run_format.py), written once for every later stage;
        returns their manifest outputs."""
        from eksft_pipeline.data.chat_template import save_run_tokenizer

        tok_dir = save_run_tokenizer(tok, Path(ctx.out_dir) / "tokenizer")
        record = write_run_format(ctx.out_dir, replace(fmt, tokenizer_dir=str(tok_dir), eos=eos))
        return {"tokenizer": str(tok_dir), RUN_FORMAT_OUTPUT: str(record)}

    def run(self, ctx: StageContext) -> StageResult:
        from eksft_pipeline.data.split import split_dataset

        s = ctx.cfg.split
        tok, eos, fmt = self.run_tokenizer(ctx)  # fails here, before the split, on an EOS mismatch
        print(f"[split] EOS check: SFT targets end with {eos['end_of_turn']!r} ({eos['end_of_turn_id']}); "
              f"RL/eval stop on {eos['stop_tokens']}", flush=True)
        saved = self.save_run_format(ctx, tok, eos, fmt)
        rep = split_dataset(
            str(s.source),
            ctx.out_dir,
            n_sft=int(s.n_sft),
            n_rl=None if s.get("n_rl") is None else int(s.n_rl),
            seed=int(s.seed),
            tokenizer=tok,
            cutoff_tokens=int(s.cutoff_tokens),
            think_prefix=str(s.think_prefix),
            allow_extra_columns=bool(s.get("allow_extra_columns", False)),
        )
        d = rep.to_dict()
        out = Path(ctx.out_dir)
        return StageResult(
            outputs={
                "sft_train": str(out / d["files"]["sft"]),
                "rl_train": str(out / d["files"]["rl"]),
                "report": str(out / "split_report.json"),
                "dropped": str(out / d["files"]["dropped"]),
                **saved,
            },
            summary={**{k: d[k] for k in ("n_input", "n_valid", "n_sft", "n_rl", "n_dropped", "dropped",
                                           "think_prefix", "generation_prefix", "length_check")}, "eos": eos,
                     **({"cutoff": d["cutoff"]["note"]} if d.get("cutoff") else {})},
        )
