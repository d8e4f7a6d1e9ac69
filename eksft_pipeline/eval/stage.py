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
    <run_dir>/eval/<init>/<target>/scores.parquet    + acc, score, pred, reason, policy (the RL reward
                                                     under the benchmark's answer policy) and mv_acc,
                                                     mv_pred, mv_reason (plain math-verify, for the audit)
    <run_dir>/eval/<init>/<target>/metrics.json      per benchmark: avg@n (= pass@1), unbiased pass@k
                                                     for every k in 1..n, maj@k, bootstrap CIs over
                                                     problems, and the sampling settings of every number;
                                                     verifier_audit per benchmark (eval/audit.py)

Sample storage (`<target>/samples/part-*.parquet` + `<target>/sampling.json`): each completed problem's
rows are written as one part, atomically (temporary name + rename), so a kill loses at most the problems
in flight. The saved samples are keyed by a hash of the model's CONTENT (weights, config, tokenizer files;
`model_fingerprint`) plus the sampling settings (n, temperature, top_p, max length, seed, generation
prefix, backend) -- not by the model's path: a re-trained model at the same path, or changed settings,
re-samples; the same model and settings (even after a config change elsewhere, or from a copied run
directory) score the saved samples without regenerating. `force=true` re-samples everything. A part a
kill or a disk error left unreadable is removed and its problems sampled again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eksft_pipeline.contract.artifacts import atomic_path, atomic_write_json, is_temporary
from eksft_pipeline.contract.keys import check_init_spec, eval_key, init_kind, init_model, rl_model
from eksft_pipeline.contract.recipes import plain
from eksft_pipeline.contract.stage_api import ConfigError, Stage, StageContext, StageResult, positive

SAMPLE_COLUMNS = ("benchmark", "problem_id", "sample_idx", "completion", "finish_reason", "n_tokens", "ground_truth")
# files of a model directory that say where it came from, not what it computes
_PROVENANCE = {"EXPORTED_FROM", "pretrain_log.json", "README.md"}


def model_fingerprint(ctx, model_ref: str) -> str:
    """Hash of what a model directory computes: sha256 of every file (weights, config, tokenizer, chat template,
    generation config) by relative path, provenance notes excluded. The directory comes from the run's format
    record (`ctx.run_format`); a hub name not in the local cache (sampled by vLLM, which downloads it) is keyed
    by its name."""
    try:
        p = ctx.run_format.model_dir_of(str(model_ref))
    except FileNotFoundError:
        return f"name:{model_ref}"
    return dir_fingerprint(p, ctx.manifest.hashes)


def dir_fingerprint(p: Path, cache=None) -> str:
    """sha256 over a model directory's files (see `model_fingerprint`)."""
    from eksft_pipeline.contract.manifest import HashCache

    cache = cache or HashCache(None)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p).as_posix()
        if f.name in _PROVENANCE or any(part.startswith(".") for part in f.relative_to(p).parts):
            continue
        h.update(f"{rel}\0{cache.sha256(f)}\n".encode())
    return "sha256:" + h.hexdigest()



def benchmark_specs(benchmarks: dict[str, dict]) -> list[dict[str, Any]]:
    """recipes' `benchmarks` mapping -> `eksft_pipeline.data.eval_sets.load_eval_sets` specs.

    Unknown keys in an entry raise, listing the allowed ones (see
    :func:`eksft_pipeline.data.eval_sets.specs_from_benchmarks`)."""
    from eksft_pipeline.data.eval_sets import specs_from_benchmarks

    return specs_from_benchmarks(benchmarks)


def benchmark_policies(benchmarks: dict[str, dict]) -> dict[str, Any]:
    """Benchmark name -> its answer policy (:class:`eksft_pipeline.scoring.policy.AnswerPolicy`): the entry's
    `policy` (a name such as `aime`, or a dict of fields), else chosen from its `data_source` / name as the
    reward's `policy="auto"` does (aime* -> aime, amc* -> amc, anything else -> math)."""
    from eksft_pipeline.scoring.policy import get_policy, policy_for

    out = {}
    for name, b in (benchmarks or {}).items():
        b = dict(b or {})
        spec = b.get("policy")
        try:
            out[name] = get_policy(spec) if spec not in (None, "auto") else policy_for(b.get("data_source") or name)
        except (ValueError, TypeError) as e:
            raise ValueError(f"benchmark {name}: {e}") from None
    return out


def score_samples(samples: pd.DataFrame, policies: dict[str, Any]) -> tuple[pd.DataFrame, dict]:
    """Score every sample with the project's reward under its benchmark's policy (`acc`, `score`, `pred`,
    `reason`, `policy`) and with plain math-verify for the verifier audit (`mv_acc`, `mv_pred`, `mv_reason`).
    Returns the scores and the reward counters of the project's pass."""
    from eksft_pipeline.scoring.policy import MATH
    from eksft_pipeline.scoring.reward import reset_reward_stats, reward_stats, score_batch

    pol = [policies.get(b, MATH) for b in samples.benchmark]
    items = [{"data_source": b, "solution_str": c, "ground_truth": g, "policy": p}
             for b, c, g, p in zip(samples.benchmark, samples.completion, samples.ground_truth, pol)]
    reset_reward_stats()
    scored = score_batch(items)
    rstats = reward_stats()
    plain = score_batch(items, extraction="plain")
    scores = samples.copy()
    scores["acc"] = [bool(s["acc"]) for s in scored]
    scores["score"] = [float(s["score"]) for s in scored]
    scores["pred"] = [str(s.get("pred", "")) for s in scored]
    scores["reason"] = [str(s.get("reason", "")) for s in scored]
    scores["policy"] = [p.name for p in pol]
    scores["mv_acc"] = [bool(s["acc"]) for s in plain]
    scores["mv_pred"] = [str(s.get("pred", "")) for s in plain]
    scores["mv_reason"] = [str(s.get("reason", "")) for s in plain]
    return scores, rstats


def _policy_names(scores: pd.DataFrame) -> dict[str, str]:
    return {str(b): str(p.iloc[0]) for b, p in scores.groupby("benchmark")["policy"]} if len(scores) else {}


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
    from eksft_pipeline.eval.metrics import (
        avg_at_n,
        bootstrap_ci,
        maj_at_k_curve,
        pass_at_k_curve,
        pass_at_k_per_problem,
    )

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
            "avg@n": avg_at_n(correct),
            "pass@k": {str(k): float(v) for k, v in curve.items()},
            "pass@k_ci95": pass_ci,
            "maj@k": {str(k): float(v) for k, v in maj.items()},
            "finish_length_frac": float((df["finish_reason"] == "length").mean()),
            "mean_completion_tokens": float(df["n_tokens"].mean()),
            "reward_reasons": {str(k): int(v) for k, v in df["reason"].value_counts().items()},
            "per_problem_acc": {str(p): float(c.mean()) for p, c in zip(pids, correct)},
        }
    return out


def open_sample_parts(tdir: Path, target: str, settings: dict[str, Any], model_path: str, *,
                      derived: tuple[str, ...] = ()) -> tuple[Path, set[tuple[str, int]], Any]:
    """Open one target's resumable sample storage (module docstring): ``(parts dir, {(problem_id, sample_idx)
    already saved}, save)``. Saved parts made under other settings (``sampling.json``: the model's content hash and
    the sampling settings) are discarded; the ``derived`` files (rebuilt from the parts) are removed; a temporary
    a kill left and an unreadable part are removed (their problems are sampled again). ``save(rows)`` writes one
    completed problem's rows as the next part, atomically. Shared by the maths and the tool-use evals."""
    parts, sfile = tdir / "samples", tdir / "sampling.json"
    try:
        saved = json.loads(sfile.read_text())
        saved.pop("model_path", None)
    except (OSError, ValueError, AttributeError):
        saved = None
    if parts.exists() and saved != settings:
        why = "no readable sampling.json" if saved is None else "the model's weights or the sampling settings differ"
        print(f"[eval] {target}: discarding saved samples ({why})", flush=True)
        shutil.rmtree(parts)
    for name in derived:  # derived: rebuilt from the parts
        (tdir / name).unlink(missing_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sfile, settings | {"model_path": str(model_path)}, indent=2)

    existing: set[tuple[str, int]] = set()
    last = -1
    for f in sorted(parts.iterdir()):
        if is_temporary(f.name):  # a write a kill interrupted
            f.unlink(missing_ok=True)
            continue
        if not (f.name.startswith("part-") and f.suffix == ".parquet"):
            continue
        try:
            d = pd.read_parquet(f)
            missing = [c for c in SAMPLE_COLUMNS if c not in d.columns]
            if missing:
                raise ValueError(f"columns {missing} missing")
        except Exception as e:  # noqa: BLE001 - any unreadable part is a leftover to redo
            print(f"[eval] {target}: {f.name} is unreadable ({type(e).__name__}); removing it, its problems "
                  "are sampled again", flush=True)
            f.unlink(missing_ok=True)
            continue
        existing |= set(zip(d.problem_id, d.sample_idx.astype(int)))
        last = max(last, int(f.stem.split("-")[1]) if f.stem.split("-")[1].isdigit() else last)
    n_parts = last + 1

    def save(rows):
        """Persist one completed problem's rows as a new part (atomic)."""
        nonlocal n_parts
        if rows:
            with atomic_path(parts / f"part-{n_parts:06d}.parquet") as tmp:
                pd.DataFrame(rows).to_parquet(tmp, index=False)
            n_parts += 1

    return parts, existing, save


def read_sample_parts(parts: Path, target: str, wanted: set[str], n_of: dict[str, int]) -> pd.DataFrame:
    """Every saved sample of the ``wanted`` problems (first copy of a (problem, sample) pair; sample indices below
    the benchmark's n), sorted by benchmark, problem, sample."""
    files = sorted(parts.glob("part-*.parquet"))
    if not files:
        raise RuntimeError(f"eval {target}: no samples were produced in {parts}")
    samples = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    samples = samples.drop_duplicates(["problem_id", "sample_idx"], keep="first")
    samples = samples[samples.problem_id.isin(wanted) & (samples.sample_idx < samples.benchmark.map(n_of))]
    return samples.sort_values(["benchmark", "problem_id", "sample_idx"]).reset_index(drop=True)


class EvalStage(Stage):
    name = "eval"
    tracked = True  # one tracker run per target model (log_eval_metrics)
    resources = {"num_cpus": 1, "num_gpus": "all"}
    # saved samples carry their own key (model content + sampling settings): kept across config changes
    resume_keyed_by_content = True

    def key(self, cfg):
        return eval_key(cfg)

    @property
    def keep_on_retry(self):  # target dirs hold resumable samples
        return ("sft", "rl", "base")

    def config(self, cfg):
        return {"eval": plain(cfg.eval), "init": cfg.get("init"), "method": str(cfg.method.name),
                "model": str(cfg.model.path)}

    # -- targets ----------------------------------------------------------------------------------
    def targets(self, ctx: StageContext) -> dict[str, str]:
        cfg = ctx.cfg
        spec = ctx.init_spec()
        out = {}
        for t in list(cfg.eval.targets):
            if t == "base":
                out["base"] = str(cfg.model.path)
            elif t == "sft":
                if init_kind(ctx) == "base":
                    continue  # no SFT stage in front of an RL run from the base model
                out["sft"] = init_model(ctx, placeholder=True)  # a path / hub name given as init is the "SFT" model
            elif t == "rl":
                out["rl"] = rl_model(ctx, placeholder=True)
            else:
                raise ValueError(f"eval.targets: unknown target {t!r} (sft, rl, base)")
        if not out:
            raise ValueError(f"eval: no model to evaluate for targets {list(cfg.eval.targets)} and init={spec}")
        return out

    def check(self, ctx):
        e = ctx.cfg.eval
        if any(t in ("sft", "rl") for t in list(e.targets)):
            check_init_spec(ctx.init_spec())
        bad = [t for t in list(e.targets) if t not in ("sft", "rl", "base")]
        if bad or not list(e.targets):
            raise ConfigError(f"eval.targets={list(e.targets)}: each must be sft, rl or base")
        positive(e, "n_samples", "eval")
        positive(e, "max_response_length", "eval")
        positive(e, "temperature", "eval", zero=True, kind=float)
        top_p = positive(e, "top_p", "eval", kind=float)
        if top_p > 1:
            raise ConfigError(f"eval.top_p={top_p} must be in (0, 1]")
        positive(e, "bootstrap", "eval", zero=True)
        positive(e, "max_problems", "eval", allow_none=True)
        ks = list(e.pass_k)
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            raise ConfigError(f"eval.pass_k={ks} must be a non-empty list of integers >= 1")
        if str(e.backend) not in ("hf", "vllm"):
            raise ConfigError(f"eval.backend={e.backend!r} must be 'hf' (CPU / one GPU) or 'vllm' (GPU)")
        benches = plain(e.benchmarks) or {}
        if not benches:
            raise ConfigError("eval.benchmarks is empty; pick a benchmark recipe (recipes/benchmarks/)")
        if not ctx.dry_run:
            missing = [f"{n}: {b.get('path')}" for n, b in benches.items() if not Path(str(b.get("path"))).exists()]
            if missing:
                raise ConfigError(f"benchmark file(s) not found ({'; '.join(missing)}); put them there or set "
                                  "EKSFT_EVAL_DATA_DIR / eval_data_dir to their folder")

    def validate(self, ctx):
        """Before saved samples are discarded (a changed model): every target model's config and safetensors
        headers read, and the benchmark files loaded -- a damaged model or missing data deletes nothing."""
        self.check(ctx)
        if ctx.dry_run:
            return
        from eksft_pipeline.contract.artifacts import check_safetensors
        from eksft_pipeline.data.eval_sets import load_eval_sets

        for target, ref in self.targets(ctx).items():
            p = Path(str(ref)).expanduser()
            if not p.is_dir():
                continue  # a hub name: resolved by the sampler
            if not (p / "config.json").is_file():
                raise ConfigError(f"eval {target}: {p} has no config.json; re-run the stage that wrote it")
            try:
                json.loads((p / "config.json").read_text())
            except ValueError as e:
                raise ConfigError(f"eval {target}: {p / 'config.json'} is not valid JSON ({e})") from None
            for w in sorted(p.glob("*.safetensors")):
                check_safetensors(w)
        try:
            load_eval_sets(benchmark_specs(plain(ctx.cfg.eval.benchmarks)))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"eval benchmarks: {e}") from None

    def inputs(self, ctx):
        inp = {f"model_{k}": v for k, v in self.targets(ctx).items() if Path(v).exists()}
        for name, b in (plain(ctx.cfg.eval.benchmarks) or {}).items():
            # a hub set (`hub:`) is an input by content when hub.id is a local file; a hub name is in the config
            # (id, revision), and the revision it resolved to is in the stage's summary
            local = b.get("path") or (b.get("hub") or {}).get("id")
            if local and (b.get("path") or Path(str(local)).expanduser().exists()):
                inp[f"bench_{name}"] = str(local)
        return inp

    def sampling_params(self, ctx):
        from eksft_pipeline.eval.sampling import SamplingParams

        e = ctx.cfg.eval
        return SamplingParams(n=int(e.n_samples), temperature=float(e.temperature), top_p=float(e.top_p),
                              max_new_tokens=int(e.max_response_length), seed=int(ctx.cfg.seed),
                              generation_prefix=ctx.run_format.generation_prefix,
                              chat_template=ctx.run_format.template_or_empty)

    def describe(self, ctx):
        params = self.sampling_params(ctx)
        return {"stage": "eval", "key": ctx.key, "targets": self.targets(ctx),
                "backend": str(ctx.cfg.eval.backend), "sampling": params.as_dict(),
                "n_by_benchmark": benchmark_n(plain(ctx.cfg.eval.benchmarks) or {}, params.n),
                "benchmarks": plain(ctx.cfg.eval.benchmarks)}

    # -- run --------------------------------------------------------------------------------------
    def run(self, ctx: StageContext) -> StageResult:
        from eksft_pipeline.data.eval_sets import load_eval_sets
        from eksft_pipeline.eval.sampling import Problem

        cfg = ctx.cfg
        sets = load_eval_sets(benchmark_specs(plain(cfg.eval.benchmarks)))
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
        from eksft_pipeline.contract.tracking import identity_of

        ident = identity_of(ctx)
        for target, model_dir in self.targets(ctx).items():
            tdir = ctx.out_dir / target
            metrics = self._eval_target(ctx, target, model_dir, problems, params, tdir)
            if ident is not None:
                run = log_eval_metrics(ident.child(target), metrics)
                summary.setdefault("tracking_runs", {})[target] = {"run_id": run.run_id, "name": run.name}
            outputs[f"{target}_metrics"] = str(tdir / "metrics.json")
            outputs[f"{target}_samples"] = str(tdir / "samples.parquet")
            summary[target] = {b: {"avg@n": m["avg@n"], f"pass@{m['n_samples']}": m["pass@k"][str(m["n_samples"])]}
                               for b, m in metrics["benchmarks"].items()}
        return StageResult(outputs=outputs, summary=summary)

    def _eval_target(self, ctx, target, model_dir, problems, params, tdir: Path) -> dict:
        from eksft_pipeline.eval.audit import verifier_audit
        from eksft_pipeline.scoring.reward import shutdown_pool

        cfg = ctx.cfg
        settings = params.as_dict() | {"model_hash": model_fingerprint(ctx, str(model_dir)),
                                       "backend": str(cfg.eval.backend)}
        n_of = benchmark_n(plain(cfg.eval.benchmarks) or {}, params.n)
        if any(v != params.n for v in n_of.values()):  # recorded only when a benchmark sets its own n
            settings["n_by_benchmark"] = n_of
        parts, existing, save = open_sample_parts(tdir, target, settings, str(model_dir),
                                                  derived=("samples.parquet", "scores.parquet", "metrics.json"))

        todo = [p for p in problems if any((p.problem_id, i) not in existing for i in range(n_of[p.benchmark]))]
        if todo:
            self._sample(ctx, target, model_dir, todo, params, n_of, existing, save, tdir)
        else:
            print(f"[eval] {target}: all samples present, scoring saved samples", flush=True)
        samples = read_sample_parts(parts, target, {p.problem_id for p in problems}, n_of)
        with atomic_path(tdir / "samples.parquet") as tmp:
            samples.to_parquet(tmp, index=False)

        try:
            scores, rstats = score_samples(samples, benchmark_policies(plain(cfg.eval.benchmarks)))
        finally:
            shutdown_pool()  # the verifier processes must not outlive the stage
        with atomic_path(tdir / "scores.parquet") as tmp:
            scores.to_parquet(tmp, index=False)

        per_bench = metrics_for(scores, n_of, [int(k) for k in cfg.eval.pass_k],
                                n_boot=int(cfg.eval.bootstrap), seed=int(cfg.seed))
        result = {"target": target, "model": str(model_dir), "sampling": settings,
                  "reward_stats": _jsonable(rstats), "benchmarks": per_bench,
                  "verifier_audit": _jsonable(verifier_audit(scores, policies=_policy_names(scores)))}
        atomic_write_json(tdir / "metrics.json", result, indent=2)
        return result

    @staticmethod
    def _sample(ctx, target, model_dir, todo, params, n_of, existing, save, tdir: Path) -> None:
        """Sample the missing samples of `todo` with the configured backend; each problem's rows go to `save`."""
        cfg = ctx.cfg
        backend = str(cfg.eval.backend)
        # one sampling pass per distinct n (benchmarks may set their own n_samples)
        groups = {n: [p for p in todo if n_of[p.benchmark] == n] for n in sorted({n_of[p.benchmark] for p in todo})}
        print(f"[eval] {target}: sampling {len(todo)} problems x {'/'.join(map(str, groups))} with {backend} "
              f"from {model_dir}", flush=True)
        if backend == "hf":
            from eksft_pipeline.eval.sampling import HFSampler, sample_problems, torch_dtype

            device = "cuda" if str(cfg.cluster.device) == "cuda" else "cpu"
            sampler = HFSampler(str(model_dir), dtype=torch_dtype(str(cfg.eval.dtype)), device=device,
                                chunk=int(cfg.eval.get("hf_chunk", 16)))  # fmt: skip
            for n, group in groups.items():
                sample_problems(sampler, group, replace(params, n=n), existing, save)
            del sampler  # free the model before the next target's
        elif backend == "vllm":
            EvalStage.sample_vllm(ctx, model_dir, todo, params, existing, save, tdir, n_by_benchmark=n_of)
        else:
            raise ValueError(f"eval.backend must be 'hf' or 'vllm', got {backend!r}")

    @staticmethod
    def sample_vllm(ctx: StageContext, model_dir, todo, params, existing, save, tdir: Path, *,
                    n_by_benchmark: dict[str, int] | None = None) -> None:
        """`todo` sampled with vLLM: data-parallel engines, one process each, over the node's visible GPUs (they
        exit before the next target's engines start). Shared by the maths and the tool-use evals."""
        from eksft_pipeline.eval.sampling import sample_with_vllm, vllm_engine_config

        cfg = ctx.cfg
        vcfg = plain(cfg.eval.get("vllm")) or {}
        device = "cuda" if str(cfg.cluster.device) == "cuda" else "cpu"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = ([d for d in visible.split(",") if d.strip()] if visible
                   else [str(i) for i in range(int(cfg.cluster.gpus_per_node))])  # fmt: skip
        sample_with_vllm(str(model_dir), todo, params, existing, save,
                         engine=vllm_engine_config(vcfg, str(cfg.eval.dtype)), work_dir=tdir / "engines",
                         device=device, num_engines=vcfg.get("num_engines"), visible_devices=visible,
                         python=vcfg.get("python"), env=ctx.env(), n_by_benchmark=n_by_benchmark)  # fmt: skip








def eval_table(metrics: dict) -> pd.DataFrame:
    """One target's pass@k / maj@k table: one row per (benchmark, k), k = 1..n (the tracker's `pass_at_k` table)."""
    rows = []
    for bench, m in sorted(metrics["benchmarks"].items()):
        for k, v in sorted(m["pass@k"].items(), key=lambda kv: int(kv[0])):
            rows.append({"benchmark": bench, "k": int(k), "pass@k": float(v), "maj@k": m["maj@k"].get(k),
                         "n_samples": int(m["n_samples"]), "n_problems": int(m["n_problems"])})
    return pd.DataFrame(rows, columns=["benchmark", "k", "pass@k", "maj@k", "n_samples", "n_problems"])


def log_eval_metrics(identity, metrics: dict):
    """Log one eval target to its tracker run (`eval/<init>/<target>`, see contract/tracking.py):

    - history step k (k = 1..n): `<benchmark>/pass@k` (the curve, x = k) and `<benchmark>/maj@k` where computed;
      step 1 also holds `<benchmark>/avg@n` (= pass@1) and the mean over benchmarks `mean/avg@n`;
    - summary: `<benchmark>/avg@n`, `<benchmark>/pass@<n>`, problems and samples per problem;
    - table `pass_at_k`: every (benchmark, k) row (wandb.Table; TensorBoard: as text).

    Returns the identity it logged under."""
    from eksft_pipeline.contract.tracking import StageRun

    benches = metrics["benchmarks"]
    config = {"target": metrics.get("target"), "model": metrics.get("model"), "sampling": metrics.get("sampling")}
    with StageRun(identity, config=_jsonable(config)) as run:
        n_max = max(int(m["n_samples"]) for m in benches.values())
        for k in range(1, n_max + 1):
            row: dict[str, float] = {}
            for b, m in benches.items():
                if str(k) in m["pass@k"]:
                    row[f"{b}/pass@k"] = m["pass@k"][str(k)]
                if str(k) in m["maj@k"]:
                    row[f"{b}/maj@k"] = m["maj@k"][str(k)]
            if k == 1:
                row |= {f"{b}/avg@n": m["avg@n"] for b, m in benches.items()}
                row["mean/avg@n"] = float(np.mean([m["avg@n"] for m in benches.values()]))
            run.log(row, step=k)
        run.table("pass_at_k", eval_table(metrics))
        summ: dict[str, Any] = {}
        for b, m in benches.items():
            n = str(m["n_samples"])
            summ |= {f"{b}/avg@n": m["avg@n"], f"{b}/pass@{n}": m["pass@k"][n], f"{b}/n_problems": m["n_problems"],
                     f"{b}/n_samples": m["n_samples"]}
        run.summary(summ)
    return identity


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))
