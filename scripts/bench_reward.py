"""Accuracy and throughput of the math reward (eksft_pipeline.scoring.reward) against plain math-verify.

1. Accuracy on the labelled corpus (``scripts/devtools/verifier_corpus.py``: builtin MATH-style golds plus
   the AIME/AMC/MATH golds of ``--eval-parquet``, default ``../shared/data/eval/luffy_valid_all.parquet``
   when it exists; each gold in many equivalent and wrong forms inside R1-style completions, labels from
   construction). For the held-out part (``--corpus-split``, golds never looked at while tuning) it prints
   the false-negative and false-positive counts and rates of this project's verifier and of plain
   math-verify (verl 0.9.1's ``math_verify`` reward semantics, math-verify 0.9.0 defaults), their scoring
   rate on the corpus, the target check (project FN <= half of plain's, FP <= plain's) and the corpus
   categories where either verifier errs.
2. Throughput on ``--n`` realistic completions (default 10,000): ``--samples-per-prompt`` (16) per gold
   answer, each an R1-style trace ``<think>\\n ... </think>\\n\\n ... \\boxed{ans}`` of
   ``--min-chars``..``--max-chars`` characters. Golds come from a built-in table of answer families with
   random parameters (AIME integers 50%, AMC "n.0" 10%, fractions 15%, k*sqrt(m) 8%, multiples of pi 7%,
   polar pairs 4%, complex 3%, degrees 3%; each with equivalent LaTeX forms and near-miss distractors) or,
   with ``--eval-parquet PATH``, from that parquet. Per prompt a solve rate is drawn uniformly from [0, 1];
   a sample is correct (in a random equivalent form, canonical 60% of the time), wrong (mostly one of three
   per-prompt distractors, as models repeat their mistakes; sometimes a fresh wrong number), or has no
   answer (5%: no box, or an unclosed box of a truncated trace). Then it times, each on a freshly started
   worker pool warmed on ``--warmup`` completions of another seed (a long RL/eval job keeps its workers
   warm), reporting wall time and the CPU seconds of the caller and the verifier workers (on a shared
   machine the wall numbers include other processes' load; the CPU-based figure is what the 2 cores would
   do alone):
   * ``score_batch`` over all completions in batches of ``--batch`` with the cache (LRU + in-batch
     de-duplication),
   * the same with ``use_cache=False`` (every completion verified on its own),
   * ``compute_score`` per completion from an 8-thread pool (how verl's reward loop calls it), with the cache,
   and prints completions/s and the cached/uncached ratio, plus the agreement with the intended labels.

    python scripts/bench_reward.py [--n 10000] [--workers 2] [--corpus-split heldout|tune|all|none]
        [--eval-parquet ../shared/data/eval/luffy_valid_all.parquet]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devtools import verifier_corpus as vc  # scripts/devtools (this script's folder is on sys.path)

from eksft_pipeline.scoring import reward


# A prompt's gold answer comes from one of these families (weights ~ an AIME/AMC/MATH mix), with random
# parameters so prompts rarely share a gold. Each returns (gold, equivalent forms math-verify 0.9.0 accepts,
# three distractors built like a model's near-miss). The accuracy line of the script checks the forms.
def _fam_int(r):
    n = r.randint(0, 999)
    return (
        str(n),
        [str(n), f"{n}.0", f"\\text{{{n}}}", f"\\mathbf{{{n}}}"],
        [str(n + d) for d in r.sample([-3, -1, 1, 2, 10], 3)],
    )


def _fam_amc(r):
    n = r.randint(-20, 400)
    return f"{n}.0", [str(n), f"{n}.0"], [str(n + d) for d in r.sample([-2, -1, 1, 3, 5], 3)]


def _fam_frac(r):
    import math

    while True:
        p, q = r.randint(1, 60), r.randint(2, 64)
        if math.gcd(p, q) == 1:
            break
    forms = [f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}"]
    if 2**6 * 5**6 % q == 0:  # terminating decimal
        forms.append(repr(p / q))
    return forms[0], forms, [f"\\frac{{{p + d}}}{{{q}}}" for d in (1, 2, -1 if p > 1 else 3)]


def _fam_sqrt(r):
    k, m = r.randint(2, 9), r.choice([2, 3, 5, 6, 7, 10, 11, 13, 14, 15])
    forms = [f"{k}\\sqrt{{{m}}}", f"\\sqrt{{{k * k * m}}}", f"{k} \\sqrt{{{m}}}"]
    return forms[0], forms, [f"{k + d}\\sqrt{{{m}}}" for d in (1, -1, 2)]


def _fam_pi(r):
    k, q = r.randint(1, 7), r.choice([2, 3, 4, 6])
    forms = [f"\\frac{{{k}\\pi}}{{{q}}}", f"\\frac{{{k}}}{{{q}}}\\pi", f"{k}\\pi/{q}"]
    return forms[0], forms, [f"\\frac{{{k + d}\\pi}}{{{q}}}" for d in (1, 2, 3)]


def _fam_polar(r):
    a, b = r.randint(1, 9), r.choice([2, 3, 4, 6])
    gold = f"\\left( {a}, \\frac{{\\pi}}{{{b}}} \\right)"
    forms = [f"({a}, \\frac{{\\pi}}{{{b}}})", f"\\left({a},\\dfrac{{\\pi}}{{{b}}}\\right)", f"({a},\\pi/{b})"]
    return gold, forms, [f"({a + d}, \\frac{{\\pi}}{{{b}}})" for d in (1, 2, 3)]


def _fam_complex(r):
    a, b = r.randint(1, 9), r.randint(1, 9)
    return f"{a} - {b}i", [f"{a}-{b}i", f"{a} - {b}i", f"-{b}i+{a}"], [f"{a}+{b}i", f"{a + 1}-{b}i", f"{b}-{a}i"]


def _fam_degree(r):
    n = r.randint(10, 179)
    return f"{n}^\\circ", [str(n), f"{n}^\\circ", f"{n}^{{\\circ}}"], [str(n + d) for d in (-10, 5, 90)]


FAMILIES = [
    (_fam_int, 0.5),
    (_fam_amc, 0.1),
    (_fam_frac, 0.15),
    (_fam_sqrt, 0.08),
    (_fam_pi, 0.07),
    (_fam_polar, 0.04),
    (_fam_complex, 0.03),
    (_fam_degree, 0.03),
]


FILLER = [
    "Let me compute this step by step.",
    "So we have $x^2 + 3x - 4 = 0$, which factors as $(x+4)(x-1)=0$.",
    "Wait, let me double-check that computation.",
    "By the triangle inequality, $|a+b| \\le |a| + |b|$.",
    "Hmm, that does not look right. Let me reconsider the case $n = 3$.",
    "Substituting back, we get $\\frac{a}{b} = \\frac{7}{9}$.",
    "The sum telescopes: $\\sum_{k=1}^{n} \\left(\\frac{1}{k} - \\frac{1}{k+1}\\right) = 1 - \\frac{1}{n+1}$.",
    "Therefore the number of valid configurations is $\\binom{10}{3} = 120$.",
    "Alternatively, consider the problem modulo $7$.",
    "Okay, so the area is $\\frac{1}{2} \\cdot 6 \\cdot 8 = 24$.",
]


def _trace(rng: random.Random, lo: int, hi: int, final: str | None, truncated: bool) -> str:
    target = rng.randint(lo, hi)
    parts = ["<think>\n"]
    size = 0
    while size < target:
        s = rng.choice(FILLER)
        parts.append(s + ("\n\n" if rng.random() < 0.3 else " "))
        size += len(s) + 1
    body = "".join(parts)
    if truncated:
        return body + "So the answer should be \\boxed{" + (final or "1")[:2]  # cut off mid-box
    tail = "\n</think>\n\nPutting it together, we find the requested value. "
    if final is None:
        return body + tail + "I could not finish the computation."
    return body + tail + f"The answer is $\\boxed{{{final}}}$."


def _from_gold(gold: str, r: random.Random):
    """(gold, forms, distractors) for a gold string read from a parquet."""
    forms = [gold]
    if "\\frac" in gold:
        forms.append(gold.replace("\\frac", "\\dfrac"))
    if " " in gold:
        forms.append(gold.replace(" ", ""))
    try:
        v = float(gold)
        if v == int(v):
            forms += [str(int(v)), f"{int(v)}.0"]
            return gold, list(dict.fromkeys(forms)), [str(int(v) + d) for d in r.sample([-3, -1, 1, 2, 10], 3)]
    except ValueError:
        pass
    return gold, list(dict.fromkeys(forms)), [f"{gold}+{d}" for d in r.sample(range(1, 9), 3)]


def make_completions(golds: list[str] | None, n: int, per_prompt: int, lo: int, hi: int, seed: int):
    """``n`` (data_source, completion, gold) triples and their intended 0/1 labels (see module doc)."""
    rng = random.Random(seed)
    fams, weights = zip(*FAMILIES)
    items, labels = [], []
    p = 0
    while len(items) < n:
        if golds is None:
            gold, forms, distractors = rng.choices(fams, weights)[0](rng)
        else:
            gold, forms, distractors = _from_gold(golds[p % len(golds)], rng)
        p += 1
        solve = rng.random()
        for _ in range(min(per_prompt, n - len(items))):
            if rng.random() < 0.05:
                items.append(("bench", _trace(rng, lo, hi, None, truncated=rng.random() < 0.5), gold))
                labels.append(0)
            elif rng.random() < solve:
                form = forms[0] if rng.random() < 0.6 else rng.choice(forms)
                items.append(("bench", _trace(rng, lo, hi, form, False), gold))
                labels.append(1)
            else:
                wrong = rng.choice(distractors) if rng.random() < 0.85 else str(rng.randint(1000, 99999))
                items.append(("bench", _trace(rng, lo, hi, wrong, False), gold))
                labels.append(0)
    return items, labels


def _warm_pool(warm_items) -> None:
    """Fresh pool, then score a disjoint warm-up set (another seed) and clear the reward cache.

    A long RL/eval job keeps its workers, whose ANTLR/sympy internals speed up after the first few
    hundred parses (a fresh worker's first tuple parse takes ~300 ms, later ones ~50 ms); timing a cold
    pool would mostly measure that one-off cost, which is reported here instead.
    """
    reward.shutdown_pool()
    t = time.perf_counter()
    reward.score_batch(warm_items, use_cache=False)
    reward.clear_cache()
    print(f"  pool start + warm-up on {len(warm_items)} other completions: {time.perf_counter() - t:.2f}s")


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pids: list[int]) -> float:
    """user+sys CPU seconds of live processes from /proc (Linux); 0 where unreadable."""
    tot = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            tot += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return tot


def _timed(fn, quiet: bool = False):
    """Run fn(); return (result, wall_s, cpu_s of this process + verifier workers); prints the split."""
    p0, w0 = time.process_time(), _cpu_seconds(reward.worker_pids())
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    # a worker replaced mid-run loses its CPU from the count (rare: timeouts only)
    p1, w1 = time.process_time(), _cpu_seconds(reward.worker_pids())
    if not quiet:
        print(f"  CPU: caller {p1 - p0:.2f}s, verifier workers {w1 - w0:.2f}s")
    return out, wall, (p1 - p0) + (w1 - w0)


def _report(name: str, n: int, wall: float, cpu: float, cores: int) -> None:
    print(
        f"{name}: {n / wall:7.0f} completions/s wall ({wall:.2f}s); CPU {cpu:.2f}s "
        f"-> {n / max(cpu / cores, 1e-9):7.0f}/s if the {cores} cores were ours alone"
    )


def _run_batches(items, batch: int, use_cache: bool):
    out = []
    for i in range(0, len(items), batch):
        out += reward.score_batch(items[i : i + batch], use_cache=use_cache)
    return out


def corpus_accuracy(split: str, eval_parquet: Path | None, seed: int) -> None:
    """Part 1 of the module docstring: FN/FP of both verifiers on the labelled corpus."""
    golds, line = vc.default_golds(eval_parquet)
    items = vc.build_corpus(golds, seed=seed)
    part = items if split == "all" else [it for it in items if it.split == split]
    n_pos = sum(it.label for it in part)
    print(f"labelled corpus: {len(items)} pairs from {line}")
    print(f"{split} part: {len(part)} pairs ({n_pos} right answers, {len(part) - n_pos} wrong ones)")
    verdicts, table = {}, {}
    for name in vc.VERIFIERS:
        reward.clear_cache()
        res, wall, cpu = _timed(lambda name=name: vc.score_corpus(part, name), quiet=True)
        verdicts[name] = [r["acc"] == 1.0 for r in res]
        table[name] = (vc.rates(part, verdicts[name]), len(part) / wall, len(part) / max(cpu, 1e-9))
    print(f"{'verifier':<20} {'FN':>5} {'FN rate':>8} {'FP':>5} {'FP rate':>8}   pairs/s wall (per CPU-s)")
    for name, label in (("project", "project (eksft)"), ("plain", "plain math-verify")):
        r, w, c = table[name]
        print(f"{label:<20} {r['fn']:>5} {100 * r['fn_rate']:>7.2f}% {r['fp']:>5} {100 * r['fp_rate']:>7.2f}%"
              f"   {w:7.0f} ({c:.0f})")
    p, m = table["project"][0], table["plain"][0]
    met = p["fn"] <= 0.5 * m["fn"] and p["fp"] <= m["fp"]
    print(f"target (project FN <= 1/2 x plain FN, project FP <= plain FP): {'met' if met else 'NOT met'}")
    rows: dict[tuple[str, bool], list[int]] = {}
    for it, a, b in zip(part, verdicts["project"], verdicts["plain"]):
        key = (f"{it.family}/{it.form}", it.label)
        row = rows.setdefault(key, [0, 0, 0])
        row[0] += 1
        row[1] += a != it.label
        row[2] += b != it.label
    errs = sorted(((k, v) for k, v in rows.items() if v[1] or v[2]), key=lambda kv: (-kv[1][2], -kv[1][1], kv[0]))
    if errs:
        print("categories with errors (family/form, label: pairs, project errors, plain math-verify errors):")
        for (cat, lab), (n, e1, e2) in errs:
            print(f"  {cat:<48} {'right' if lab else 'wrong':<5}: {n:4d} {e1:4d} {e2:4d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--samples-per-prompt", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024, help="completions per score_batch call (an RL step's worth)")
    ap.add_argument("--min-chars", type=int, default=300)
    ap.add_argument("--max-chars", type=int, default=4000)
    ap.add_argument("--warmup", type=int, default=1000, help="completions (another seed) scored before each timing")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8, help="threads for the per-sample compute_score run")
    ap.add_argument("--eval-parquet", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus-split", choices=["heldout", "tune", "all", "none"], default="heldout",
                    help="part of the labelled corpus for the FN/FP table (none: skip it)")
    args = ap.parse_args()
    reward.configure(n_workers=args.workers)
    cores = os.cpu_count() or 1
    if args.corpus_split != "none":
        print(f"load average before: {os.getloadavg()[0]:.2f} on {cores} cores")
        reward.shutdown_pool()
        corpus_accuracy(args.corpus_split, args.eval_parquet, args.seed)
        print()

    if args.eval_parquet is not None:
        import pandas as pd

        df = pd.read_parquet(args.eval_parquet, columns=["data_source", "reward_model"])
        df = df[df.data_source.isin(["aime", "aime25", "amc", "math"])]
        golds = list(dict.fromkeys(str(r["ground_truth"]) for r in df.reward_model))
        print(f"{len(golds)} distinct golds from {args.eval_parquet}")
    else:
        golds = None
    items, labels = make_completions(golds, args.n, args.samples_per_prompt, args.min_chars, args.max_chars, args.seed)
    warm_items, _ = make_completions(
        golds, args.warmup, args.samples_per_prompt, args.min_chars, args.max_chars, args.seed + 1
    )
    mean_len = sum(len(s) for _, s, _ in items) / len(items)
    print(
        f"{len(items)} completions, {args.samples_per_prompt}/prompt, mean {mean_len:.0f} chars, "
        f"{sum(labels)} intended correct; {args.workers} verifier workers"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f} on {cores} cores (other processes slow the wall numbers)")
    _warm_pool(warm_items)
    reward.reset_reward_stats()
    res_c, t_c, cpu_c = _timed(lambda: _run_batches(items, args.batch, use_cache=True))
    st = reward.reward_stats()
    _report("cached   score_batch", len(items), t_c, cpu_c, cores)
    print(
        f"  verify_calls={st['verify_calls']} int_fast_path={st['int_fast_path']} "
        f"cache_hits={st['cache_hits']} dedup_hits={st['dedup_hits']}"
    )

    _warm_pool(warm_items)
    reward.reset_reward_stats()
    res_u, t_u, cpu_u = _timed(lambda: _run_batches(items, args.batch, use_cache=False))
    st_u = reward.reward_stats()
    _report("uncached score_batch", len(items), t_u, cpu_u, cores)
    print(f"  verify_calls={st_u['verify_calls']} int_fast_path={st_u['int_fast_path']}")
    print(f"ratio cached/uncached: {t_u / t_c:.2f}x wall, {cpu_u / cpu_c:.2f}x CPU")

    _warm_pool(warm_items)

    def threaded():
        with ThreadPoolExecutor(args.threads) as ex:
            return list(ex.map(lambda it: reward.compute_score(*it), items))

    res_t, t_t, cpu_t = _timed(threaded)
    _report(f"cached   compute_score x{args.threads} threads", len(items), t_t, cpu_t, cores)
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    acc = [r["acc"] for r in res_c]
    agree = sum(int(a) == lab for a, lab in zip(acc, labels)) / len(labels)
    same = all(a["acc"] == b["acc"] == c["acc"] for a, b, c in zip(res_c, res_u, res_t))
    print(f"agreement with intended labels: {agree:.4f}; cached == uncached == threaded: {same}")
    print(f"reasons (cached run): {st['by_reason']}")
    reward.shutdown_pool()


if __name__ == "__main__":
    main()
