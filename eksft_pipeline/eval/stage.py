"""Stage `eval`: sample n completions per problem, score them with the RL reward, compute metrics.

    python -m eksft_pipeline stage=eval init=eksft               # SFT and RL outputs of EKSFT
    python -m eksft_pipeline stage=eval init=base eval.targets=[base]
    python -m eksft_pipeline stage=eval model=qwen3-8b cluster=8gpu     # AIME25 x 320 (pass@k curves), others x 32
    python -m eksft_pipeline stage=eval ... eval.benchmarks.aime24.n_samples=320       # one more 320-sample curve

Samples per problem: `eval.n_samples`, unless the benchmark's recipe entry sets its own `n_samples`
(recipes/benchmarks/paper.yaml: AIME25 = 320, the paper's pass@k curves to k = 320 in Figs. 2-3, which are
AIME25 only), so a 320-sample curve does not mean 320 samples of every benchmark.

For each target model (`eval.targets`: `sft` = the SFT output of `init`, `rl` = the RL output of
`init`, `base` = the model before SFT) and each benchmark (`eval.benchmarks`):

    <run_dir>/eval/<init>/<target>/samples.parquet   one row per completion (prompt id, sample index,
                                                     completion, finish reason, token count)
    <run_dir>/eval/<init>/<target>/scores.parquet    + acc, score, pred, reason (math-verify reward,
                                                     the same function the RL stage uses)
    <run_dir>/eval/<init>/<target>/metrics.json      per benchmark: avg@n (= pass@1), unbiased pass@k
                                                     for every k in 1..n, maj@k, bootstrap CIs over
                                                     problems, and the sampling settings of every number

Sampling is resumable (completed problems are appended to `samples/part-*.parquet` as they finish,
and kept across a killed attempt); a re-run with the same sampling settings scores from the saved
samples without regenerating. Changing n / temperature / top_p / max length / seed re-samples.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from eksft_pipeline.pipeline.stage_api import Stage, StageContext, StageResult, init_tag, is_method_tag


def _plain(x):
    return OmegaConf.to_container(x, resolve=True) if x is not None and not isinstance(x, str | int | float) else x


def benchmark_specs(benchmarks: dict[str, dict]) -> list[dict[str, Any]]:
    """recipes' `benchmarks` mapping -> `eksft_pipeline.data.eval_sets.load_eval_sets` specs."""
    specs = []
    for name, b in benchmarks.items():
        b = dict(b)
        fmt = b.get("format") or Path(str(b["path"])).suffix.lstrip(".")
        if fmt == "parquet":
            specs.append({"path": b["path"], "format": "parquet", "benchmarks": {name: b.get("data_source", name)}})
        elif fmt == "jsonl":
            spec = {"path": b["path"], "format": "jsonl", "benchmark": name}
            for k in ("question_field", "answer_field", "system_prompt", "data_source"):
                if b.get(k) is not None:
                    spec[k] = b[k]
            specs.append(spec)
        else:
            raise ValueError(f"benchmark {name}: unknown format {fmt!r} (parquet or jsonl)")
    return specs


def benchmark_n(benchmarks: dict[str, dict], default: int) -> dict[str, int]:
    """Samples per problem of every benchmark: its own `n_samples` (e.g. AIME25's 320 for the paper's pass@k
    curves, Figs. 2-3) or `eval.n_samples`."""
    out = {}
    for name, b in benchmarks.items():
        n = (b or {}).get("n_samples")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"benchmark {name}: n_samples must be a positive integer, got {n!r}")
        out[name] = int(n) if n is not None else int(default)
    return out


def metrics_for(scores: pd.DataFrame, n: int | dict[str, int], pass_k: list[int], *, n_boot: int,
                seed: int) -> dict[str, Any]:
    """Per-benchmark metrics from one target's scored samples (exactly n samples per problem; `n` may be a
    benchmark -> n mapping, see `benchmark_n`). `per_problem_acc` (problem id -> mean accuracy) lets the report
    compare two models on the same problems (paired bootstrap)."""
    from eksft_pipeline.eval.metrics import bootstrap_ci, maj_at_k_curve, pass_at_k_curve, pass_at_k_per_problem

    out = {}
    n_of = n if isinstance(n, dict) else None
    for bench, df in scores.groupby("benchmark", sort=True):
        if n_of is not None:
            n = n_of[str(bench)]
        df = df.sort_values(["problem_id", "sample_idx"])
        counts = df.groupby("problem_id").size()
        if (counts != n).any():
            bad = counts[counts != n]
            raise ValueError(f"{bench}: problems with != {n} samples: {dict(bad.head())}")
        pids = list(counts.index)
        correct = np.stack([df[df.problem_id == p]["acc"].to_numpy(dtype=bool) for p in pids])  # [P, n]
        answers = [[(a if a else None) for a in df[df.problem_id == p]["pred"]] for p in pids]
        acc_keys = [[(a, bool(c)) if a else None for a, c in zip(ans, cor)] for ans, cor in zip(answers, correct)]
        ks = list(range(1, n + 1))
        curve = pass_at_k_curve(correct, ks)
        headline = sorted({k for k in pass_k if k <= n} | {1, n})
        pass_ci = {}
        for k in headline:
            per = pass_at_k_per_problem(correct, k)
            pt, lo, hi = bootstrap_ci(per, n_boot=n_boot, seed=seed)
            pass_ci[str(k)] = [lo, hi]
        maj = maj_at_k_curve(acc_keys, correct.tolist(), headline, seed=seed)
        out[str(bench)] = {
            "n_problems": len(pids),
            "n_samples": n,
            "avg@n": float(correct.mean()),
            "pass@k": {str(k): float(v) for k, v in curve.items()},
            "pass@k_ci95": pass_ci,
            "maj@k": {str(k): float(v) for k, v in maj.items()},
            "finish_length_frac": float((df["finish_reason"] == "length").mean()),
            "mean_completion_tokens": float(df["n_tokens"].mean()),
            "reward_reasons": {str(k): int(v) for k, v in df["reason"].value_counts().items()},
            "per_problem_acc": {str(p): float(c.mean()) for p, c in zip(pids, correct)},
        }
    return out


class EvalStage(Stage):
    name = "eval"
    resources = {"num_cpus": 1, "num_gpus": "all"}

    def key(self, cfg):
        spec = str(cfg.init) if cfg.get("init") not in (None, "") else str(cfg.method.name)
        return f"eval/{init_tag(spec)}"

    @property
    def keep_on_retry(self):  # target dirs hold resumable samples
        return ("sft", "rl", "base")

    def config(self, cfg):
        return {"eval": _plain(cfg.eval), "init": cfg.get("init"), "method": str(cfg.method.name),
                "model": str(cfg.model.path)}

    # -- targets ----------------------------------------------------------------------------------
    def targets(self, ctx: StageContext) -> dict[str, str]:
        cfg = ctx.cfg
        spec = ctx.init_spec()
        tag = init_tag(spec)
        out = {}
        for t in list(cfg.eval.targets):
            if t == "base":
                out["base"] = str(cfg.model.path)
            elif t == "sft":
                if spec == "base":
                    continue  # no SFT stage in front of an RL run from the base model
                if is_method_tag(spec) or ctx.manifest.entry(f"sft/{spec}"):
                    out["sft"] = f"<run_dir>/sft/{spec}/hf_model" if ctx.dry_run else ctx.upstream(f"sft/{spec}")["hf_model"]
                else:
                    out["sft"] = spec  # a path / hub name given as init: that model is the "SFT" model
            elif t == "rl":
                out["rl"] = f"<run_dir>/rl/{tag}/hf_model" if ctx.dry_run else ctx.upstream(f"rl/{tag}")["hf_model"]
            else:
                raise ValueError(f"eval.targets: unknown target {t!r} (sft, rl, base)")
        if not out:
            raise ValueError(f"eval: no model to evaluate for targets {list(cfg.eval.targets)} and init={spec}")
        return out

    def inputs(self, ctx):
        inp = {f"model_{k}": v for k, v in self.targets(ctx).items() if Path(v).exists()}
        for name, b in (_plain(ctx.cfg.eval.benchmarks) or {}).items():
            inp[f"bench_{name}"] = str(b["path"])
        return inp

    def _generation_prefix(self, ctx) -> str:
        try:
            rep = json.loads(Path(ctx.upstream("split")["report"]).read_text())
            return str(rep.get("generation_prefix", "") or "")
        except (FileNotFoundError, KeyError):
            return ""

    def sampling_params(self, ctx):
        from eksft_pipeline.eval.sampling import SamplingParams

        e = ctx.cfg.eval
        return SamplingParams(n=int(e.n_samples), temperature=float(e.temperature), top_p=float(e.top_p),
                              max_new_tokens=int(e.max_response_length), seed=int(ctx.cfg.seed),
                              generation_prefix=self._generation_prefix(ctx))

    def describe(self, ctx):
        params = self.sampling_params(ctx)
        return {"stage": "eval", "key": ctx.key, "targets": self.targets(ctx),
                "backend": str(ctx.cfg.eval.backend), "sampling": params.as_dict(),
                "n_by_benchmark": benchmark_n(_plain(ctx.cfg.eval.benchmarks) or {}, params.n),
                "benchmarks": _plain(ctx.cfg.eval.benchmarks)}

    # -- run --------------------------------------------------------------------------------------
    def run(self, ctx: StageContext) -> StageResult:
        from eksft_pipeline.data.eval_sets import load_eval_sets
        from eksft_pipeline.eval.sampling import Problem

        cfg = ctx.cfg
        sets = load_eval_sets(benchmark_specs(_plain(cfg.eval.benchmarks)))
        max_p = cfg.eval.get("max_problems")
        problems: list[Problem] = []
        set_summary = {}
        for name, es in sets.items():
            probs = es.problems[: int(max_p)] if max_p else es.problems
            problems += [Problem(p.benchmark, p.problem_id, [dict(m) for m in p.messages], p.ground_truth) for p in probs]
            set_summary[name] = es.summary() | {"n_evaluated": len(probs)}
        params = self.sampling_params(ctx)
        outputs: dict[str, str] = {}
        summary: dict[str, Any] = {"benchmarks": set_summary, "sampling": params.as_dict(),
                                   "backend": str(cfg.eval.backend)}
        for target, model_dir in self.targets(ctx).items():
            tdir = ctx.out_dir / target
            metrics = self._eval_target(ctx, target, model_dir, problems, params, tdir)
            outputs[f"{target}_metrics"] = str(tdir / "metrics.json")
            outputs[f"{target}_samples"] = str(tdir / "samples.parquet")
            summary[target] = {b: {"avg@n": m["avg@n"], f"pass@{m['n_samples']}": m["pass@k"][str(m["n_samples"])]}
                               for b, m in metrics["benchmarks"].items()}
        return StageResult(outputs=outputs, summary=summary)

    def _eval_target(self, ctx, target, model_dir, problems, params, tdir: Path) -> dict:
        from eksft_pipeline.rl.reward import reset_reward_stats, reward_stats, score_batch

        cfg = ctx.cfg
        settings = params.as_dict() | {"model": str(model_dir), "backend": str(cfg.eval.backend)}
        n_of = benchmark_n(_plain(cfg.eval.benchmarks) or {}, params.n)
        if any(v != params.n for v in n_of.values()):  # recorded only when a benchmark sets its own n
            settings["n_by_benchmark"] = n_of
        sfile = tdir / "sampling.json"
        if sfile.exists() and json.loads(sfile.read_text()) != settings:
            print(f"[eval] {target}: sampling settings changed; discarding saved samples in {tdir}", flush=True)
            shutil.rmtree(tdir)
        parts = tdir / "samples"
        parts.mkdir(parents=True, exist_ok=True)
        sfile.write_text(json.dumps(settings, indent=2))

        existing = set()
        for f in sorted(parts.glob("part-*.parquet")):
            d = pd.read_parquet(f, columns=["problem_id", "sample_idx"])
            existing |= set(zip(d.problem_id, d.sample_idx.astype(int)))
        n_parts = len(list(parts.glob("part-*.parquet")))

        def save(rows):
            nonlocal n_parts
            if rows:
                pd.DataFrame(rows).to_parquet(parts / f"part-{n_parts:06d}.parquet", index=False)
                n_parts += 1

        backend = str(cfg.eval.backend)
        todo = [p for p in problems if any((p.problem_id, i) not in existing for i in range(n_of[p.benchmark]))]
        # one sampling pass per distinct n (benchmarks may set their own n_samples)
        groups = {n: [p for p in todo if n_of[p.benchmark] == n] for n in sorted({n_of[p.benchmark] for p in todo})}
        if todo:
            print(f"[eval] {target}: sampling {len(todo)} problems x {'/'.join(map(str, groups))} with {backend} "
                  f"from {model_dir}", flush=True)
            if backend == "hf":
                from eksft_pipeline.eval.sampling import HFSampler, sample_problems

                device = "cuda" if str(cfg.cluster.device) == "cuda" else "cpu"
                sampler = HFSampler(str(model_dir), device=device, chunk=int(cfg.eval.get("hf_chunk", 16)))
                for n, group in groups.items():
                    sample_problems(sampler, group, replace(params, n=n), existing, save)
            elif backend == "vllm":
                from eksft_pipeline.eval.sampling import VLLMSampler, pending_samples

                vcfg = cfg.eval.get("vllm") or {}
                sampler = VLLMSampler(str(model_dir), tensor_parallel_size=int(vcfg.get("tensor_parallel_size", 1)),
                                      gpu_memory_utilization=float(vcfg.get("gpu_memory_utilization", 0.85)),
                                      seed=params.seed)
                for n, group in groups.items():
                    save(sampler.sample_many(group, pending_samples(group, n, existing), replace(params, n=n)))
            else:
                raise ValueError(f"eval.backend must be 'hf' or 'vllm', got {backend!r}")
        else:
            print(f"[eval] {target}: all samples present, scoring saved samples", flush=True)

        samples = pd.concat([pd.read_parquet(f) for f in sorted(parts.glob("part-*.parquet"))], ignore_index=True)
        samples = samples.drop_duplicates(["problem_id", "sample_idx"], keep="first")
        wanted = {p.problem_id for p in problems}
        samples = samples[samples.problem_id.isin(wanted) & (samples.sample_idx < samples.benchmark.map(n_of))]
        samples = samples.sort_values(["benchmark", "problem_id", "sample_idx"]).reset_index(drop=True)
        samples.to_parquet(tdir / "samples.parquet", index=False)

        reset_reward_stats()
        scored = score_batch(list(zip(samples.benchmark, samples.completion, samples.ground_truth)))
        rstats = reward_stats()
        scores = samples.copy()
        scores["acc"] = [bool(s["acc"]) for s in scored]
        scores["score"] = [float(s["score"]) for s in scored]
        scores["pred"] = [str(s.get("pred", "")) for s in scored]
        scores["reason"] = [str(s.get("reason", "")) for s in scored]
        scores.to_parquet(tdir / "scores.parquet", index=False)

        per_bench = metrics_for(scores, n_of, [int(k) for k in cfg.eval.pass_k],
                                n_boot=int(cfg.eval.bootstrap), seed=int(cfg.seed))
        result = {"target": target, "model": str(model_dir), "sampling": settings,
                  "reward_stats": _jsonable(rstats), "benchmarks": per_bench}
        (tdir / "metrics.json").write_text(json.dumps(result, indent=2))
        return result


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))
