"""Stage `eval` of `task=tool_use` (registry name `tool_eval`): generate on BFCL, score with BFCL's own checker.

    python -m eksft_pipeline task=tool_use stage=eval method=eksft          # base + the SFT output of eksft
    python -m eksft_pipeline task=tool_use stage=eval model=qwen3-8b cluster=8gpu   # vLLM engines on 8 GPUs

Same manifest key as the maths eval (`eval/<init>`) and the same sampler (:mod:`eksft_pipeline.eval.sampling`:
HF `generate` on CPU, vLLM engines on GPU), with the run's chat template; prompts are BFCL entries with their
function docs rendered into the system turn as the SFT data renders ACEBench's (:func:`eval.bfcl.prompt_messages`).
For each target (`task.eval.targets`: `base`, `sft`) it writes

    <run_dir>/eval/<init>/<target>/samples.parquet    one row per entry: completion, finish reason, correct,
                                                       strict parse status, BFCL error type
    <run_dir>/eval/<init>/<target>/metrics.json       eval.bfcl.summarize(): per category, BFCL live overall,
                                                       irrelevance mean (bootstrap CIs), parse-failure / no-call

Data (`task.eval.source`): `bfcl` = the installed bfcl-eval package's BFCL v4 data; `tiny` = the twin's
held-out BFCL-layout entries written by the tool split; or a folder in BFCL's layout. `task.eval.max_per_category`
evaluates the first N entries of each category (null = all). One completion per entry (`task.eval.n_samples`,
the paper reports single-run BFCL accuracy). Samples are resumable as the maths eval's are (the same storage,
:func:`eksft_pipeline.eval.stage.open_sample_parts`): each entry's completion is saved as one part under
`<target>/samples/` the moment it is done, keyed by `sampling.json` (model content, sampling settings, backend,
a hash of the prompts), so a killed eval re-samples only the entries in flight; a damaged part is removed and its
entry sampled again. Completions another eval of this run dir made with the same settings are reused (the base
model is sampled once per sweep).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from eksft_pipeline.contract.artifacts import atomic_path, atomic_write_json
from eksft_pipeline.contract.keys import check_init_spec, init_kind, init_model
from eksft_pipeline.contract.recipes import plain
from eksft_pipeline.contract.stage_api import ConfigError, StageContext, StageResult, positive
from eksft_pipeline.eval.stage import EvalStage, model_fingerprint, open_sample_parts, read_sample_parts

TARGETS = ("base", "sft")


class ToolEvalStage(EvalStage):
    name = "eval"
    resume_keyed_by_content = True  # saved parts carry their own key (sampling.json)
    keep_on_retry = TARGETS  # <target>/samples/ parts are the resume points

    def config(self, cfg):
        return {"task_eval": plain(cfg.task.eval), "init": cfg.get("init"), "method": str(cfg.method.name),
                "model": str(cfg.model.path), "backend": str(cfg.eval.backend), "dtype": str(cfg.eval.dtype),
                "chat_template": str(cfg.model.get("chat_template") or ""), "seed": int(cfg.seed)}  # fmt: skip

    def targets(self, ctx: StageContext) -> dict[str, str]:
        out = {}
        for t in list(ctx.cfg.task.eval.targets):
            if t == "base":
                out["base"] = str(ctx.cfg.model.path)
            elif t == "sft" and init_kind(ctx) != "base":
                out["sft"] = init_model(ctx, placeholder=True)
        if not out:
            raise ValueError(f"eval: no model to evaluate for task.eval.targets={list(ctx.cfg.task.eval.targets)}")
        return out

    def check(self, ctx):
        from eksft_pipeline.eval.bfcl import CATEGORIES

        e = ctx.cfg.task.eval
        bad = [t for t in list(e.targets) if t not in TARGETS]
        if bad or not list(e.targets):
            raise ConfigError(f"task.eval.targets={list(e.targets)}: each must be one of {list(TARGETS)} (no RL here)")
        if "sft" in list(e.targets):
            check_init_spec(ctx.init_spec())
        cats = list(e.categories)
        if not cats or any(c not in CATEGORIES for c in cats):
            raise ConfigError(f"task.eval.categories={cats} must be a non-empty subset of {list(CATEGORIES)}")
        if int(e.n_samples) != 1:
            raise ConfigError(f"task.eval.n_samples={e.n_samples}: BFCL is scored on one completion per entry")
        positive(e, "max_response_length", "task.eval")
        positive(e, "temperature", "task.eval", zero=True, kind=float)
        positive(e, "max_per_category", "task.eval", allow_none=True)
        positive(e, "bootstrap", "task.eval")
        if str(ctx.cfg.eval.backend) not in ("hf", "vllm"):
            raise ConfigError(f"eval.backend={ctx.cfg.eval.backend!r} must be 'hf' or 'vllm'")
        src = str(e.source)
        if src not in ("bfcl", "tiny") and not ctx.dry_run and not Path(src).is_dir():
            raise ConfigError(f"task.eval.source={src}: use bfcl (the installed bfcl-eval), tiny, or a BFCL folder")

    def inputs(self, ctx):
        inp = {f"model_{k}": v for k, v in self.targets(ctx).items() if Path(v).exists()}
        src = str(ctx.cfg.task.eval.source)
        if src not in ("bfcl", "tiny"):
            inp["bfcl_data"] = src
        return inp

    def data_dir(self, ctx) -> str | None:
        src = str(ctx.cfg.task.eval.source)
        if src == "bfcl":
            return None  # the installed package's data
        if src == "tiny":
            if ctx.dry_run:
                return str(ctx.run_dir / "split" / "tiny_tool_data" / "bfcl")
            d = ctx.upstream("split").get("bfcl_eval_dir")
            if not d:
                raise ConfigError("task.eval.source=tiny but the split wrote no twin eval set (task.data.source=tiny)")
            return str(d)
        return src

    def sampling_params(self, ctx):
        from eksft_pipeline.eval.sampling import SamplingParams

        e = ctx.cfg.task.eval
        return SamplingParams(n=1, temperature=float(e.temperature), top_p=float(e.top_p),
                              max_new_tokens=int(e.max_response_length), seed=int(ctx.cfg.seed),
                              generation_prefix=ctx.run_format.generation_prefix,
                              chat_template=ctx.run_format.template_or_empty)

    def describe(self, ctx):
        return {"stage": "eval", "task": "tool_use", "key": ctx.key, "targets": self.targets(ctx),
                "backend": str(ctx.cfg.eval.backend), "sampling": self.sampling_params(ctx).as_dict(),
                "bfcl_data": self.data_dir(ctx) or "bfcl_eval package data", "scorer": "bfcl_eval ast_checker",
                **{k: v for k, v in plain(ctx.cfg.task.eval).items() if k != "targets"}}  # fmt: skip

    # -- run --------------------------------------------------------------------------------------
    def run(self, ctx: StageContext) -> StageResult:
        from eksft_pipeline.eval import bfcl
        from eksft_pipeline.eval.sampling import Problem

        e = ctx.cfg.task.eval
        ddir = self.data_dir(ctx)
        entries: dict[tuple[str, str], dict] = {}
        problems: list[Problem] = []
        for cat in list(e.categories):
            es = bfcl.load_category(cat, ddir)
            if e.get("max_per_category"):
                es = es[: int(e.max_per_category)]
            for ent in es:
                entries[(cat, ent["id"])] = ent
                problems.append(Problem(cat, f"{cat}/{ent['id']}", bfcl.prompt_messages(ent),
                                        json.dumps(ent["possible_answer"])))  # fmt: skip
        params = self.sampling_params(ctx)
        outputs: dict[str, str] = {}
        summary: dict[str, Any] = {"n_entries": len(problems), "sampling": params.as_dict(),
                                   "bfcl_data": ddir or str(bfcl.data_dir())}  # fmt: skip
        for target, model_dir in self.targets(ctx).items():
            tdir = ctx.out_dir / target
            tdir.mkdir(parents=True, exist_ok=True)
            settings = self._settings(ctx, model_dir, problems, params)
            rows = self._reuse(ctx, settings, tdir)
            if rows is None:
                rows = self._sample(ctx, target, model_dir, problems, params, tdir, settings)
            else:
                atomic_write_json(tdir / "sampling.json", settings | {"model_path": str(model_dir)}, indent=2)
            scored = []
            for r in rows:
                cat, eid = r["problem_id"].split("/", 1)
                s = bfcl.score_entry(cat, entries[(cat, eid)], r["completion"])
                scored.append({**r, "id": eid, "correct": bool(s["correct"]), "status": s["status"],
                               "error_type": s["error_type"]})  # fmt: skip
            df = pd.DataFrame(scored).sort_values(["benchmark", "problem_id"]).reset_index(drop=True)
            with atomic_path(tdir / "samples.parquet") as tmp:
                df.to_parquet(tmp, index=False)
            metrics = {"task": "tool_use", "target": target, "model": str(model_dir),
                       "model_name": str(ctx.cfg.model.name), "method": str(ctx.cfg.method.name),
                       "init": ctx.init_spec(), "sampling": settings,
                       "finish_length_rate": round(100 * float((df.finish_reason == "length").mean()), 2),
                       "bfcl": bfcl.summarize(df.rename(columns={"benchmark": "category"}).to_dict("records"),
                                              n_boot=int(e.bootstrap), seed=int(ctx.cfg.seed))}  # fmt: skip
            atomic_write_json(tdir / "metrics.json", metrics, indent=2)
            outputs[f"{target}_metrics"] = str(tdir / "metrics.json")
            outputs[f"{target}_samples"] = str(tdir / "samples.parquet")
            b = metrics["bfcl"]
            summary[target] = {k: b[k]["score"] for k in ("live_overall", "irrelevance_mean") if k in b}
            print(f"[eval] tool_use {target}: {summary[target]} rates {b['rates']}", flush=True)
        return StageResult(outputs=outputs, summary=summary)

    @staticmethod
    def _settings(ctx, model_dir: str, problems: list, params) -> dict[str, Any]:
        """What a completion depends on: the model's content, the sampling settings, the backend, the prompts."""
        import hashlib

        prompts = hashlib.sha256(json.dumps([(p.problem_id, p.messages) for p in problems]).encode()).hexdigest()
        return params.as_dict() | {"backend": str(ctx.cfg.eval.backend), "dtype": str(ctx.cfg.eval.dtype),
                                   "model_hash": model_fingerprint(ctx, str(model_dir)),
                                   "prompts_sha256": prompts, "n_entries": len(problems)}  # fmt: skip

    @staticmethod
    def _reuse(ctx, settings: dict, tdir: Path) -> list[dict] | None:
        """The completions of an earlier eval in this run dir with the same settings (the base model is evaluated
        by every method's eval: sampled once, reused), or None. Only a finished eval's (its samples.parquet)."""
        for f in sorted((ctx.run_dir / "eval").glob("**/sampling.json")):
            if f.parent == tdir or not (f.parent / "samples.parquet").is_file():
                continue
            try:
                saved = json.loads(f.read_text())
                same = isinstance(saved, dict) and {k: v for k, v in saved.items() if k != "model_path"} == settings
            except (OSError, ValueError):
                continue
            if same:
                df = pd.read_parquet(f.parent / "samples.parquet")
                print(f"[eval] tool_use: reusing the completions of {f.parent} (same model content and settings)",
                      flush=True)
                cols = ["benchmark", "problem_id", "sample_idx", "completion", "finish_reason", "n_tokens",
                        "ground_truth", "seed"]  # fmt: skip
                return df[cols].to_dict("records")
        return None

    def _sample(self, ctx, target: str, model_dir: str, problems: list, params, tdir: Path,
                settings: dict) -> list[dict]:
        """Sample the entries not yet saved under ``tdir/samples`` (one part per entry), then read every part."""

        cfg = ctx.cfg
        parts, existing, save = open_sample_parts(tdir, target, settings, str(model_dir),
                                                  derived=("samples.parquet", "metrics.json"))
        todo = [p for p in problems if (p.problem_id, 0) not in existing]
        backend = str(cfg.eval.backend)
        if not todo:
            print(f"[eval] tool_use {target}: all {len(problems)} entries saved, scoring them", flush=True)
        elif backend == "hf":
            from eksft_pipeline.eval.sampling import HFSampler, sample_problems, torch_dtype

            device = "cuda" if str(cfg.cluster.device) == "cuda" else "cpu"
            sampler = HFSampler(str(model_dir), dtype=torch_dtype(str(cfg.eval.dtype)), device=device,
                                chunk=int(cfg.eval.get("hf_chunk", 16)))  # fmt: skip
            print(f"[eval] tool_use {target}: sampling {len(todo)} of {len(problems)} BFCL entries with hf from "
                  f"{model_dir}", flush=True)
            sample_problems(sampler, todo, params, existing, save)
            del sampler
        else:
            print(f"[eval] tool_use {target}: sampling {len(todo)} of {len(problems)} BFCL entries with vllm from "
                  f"{model_dir}", flush=True)
            self.sample_vllm(ctx, model_dir, todo, params, existing, save, tdir)
        df = read_sample_parts(parts, target, {p.problem_id for p in problems}, {c: 1 for c in {p.benchmark for p in problems}})
        if len(df) != len(problems):
            raise RuntimeError(f"eval tool_use {target}: {len(df)} completions for {len(problems)} entries")
        return df.to_dict("records")
