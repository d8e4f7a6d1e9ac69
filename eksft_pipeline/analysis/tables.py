"""Paper-style result tables (Table 1: avg@n = pass@1; Table 2: pass@k; Table 3: the regulariser ablations;
Table 8: rho sensitivity; Table 9: random masking vs EKSFT) as rows, Markdown and CSV.

Rows are evaluated models (`<method> (SFT)`, `<method> (SFT→RL)`, the base model as the paper's
"Original Model"), columns the benchmarks
in a fixed order plus their unweighted mean ("Avg", as the paper averages benchmarks, not
problems). Every row carries the sampling settings its numbers were produced with.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from eksft_pipeline.analysis.gather import EvalResult

PAPER_ORDER = ("aime24", "aime25", "amc", "hmmt25")
SETTING_KEYS = ("n", "temperature", "top_p", "max_new_tokens")
# the paper's name of the row of the model before SFT (Tables 1-2)
ORIGINAL_MODEL = "Original Model (base)"


def benchmark_order(evals: Sequence[EvalResult]) -> list[str]:
    names = {b for e in evals for b in e.benchmarks}
    known = [b for b in PAPER_ORDER if b in names]
    return known + sorted(names - set(known))


def metric_value(bench: dict, metric: str) -> float | None:
    """`avg@n` or `pass@K` / `maj@K` (None when K exceeds the samples drawn)."""
    if metric == "avg@n":
        return float(bench["avg@n"])
    kind, _, k = metric.partition("@")
    table = bench.get(f"{kind}@k", {})
    return None if k not in table else float(table[k])



def _fill_benchmarks(row: dict, e, benches: list[str], metric: str) -> None:
    """row[b] = the metric of every benchmark (None where missing), row["Avg"] = their mean -- only when the
    row has every benchmark: a partial mean is not comparable."""
    vals = []
    for b in benches:
        v = metric_value(e.benchmarks[b], metric) if b in e.benchmarks else None
        row[b] = v
        if v is not None:
            vals.append(v)
    row["Avg"] = sum(vals) / len(vals) if vals and len(vals) == len(benches) else None

def result_rows(evals: Sequence[EvalResult], metric: str) -> tuple[list[str], list[dict]]:
    """(columns, rows): one row per evaluated model, values in [0, 1], `Avg` over the row's benchmarks."""
    benches = benchmark_order(evals)
    rows = []
    rank = {"base": 0, "sft": 1, "rl": 2}
    for e in sorted(evals, key=lambda e: (rank.get(e.target, 3) != 0, e.init, rank.get(e.target, 3))):
        row: dict = {"model": ORIGINAL_MODEL if e.target == "base" else e.label, "init": e.init, "target": e.target}
        _fill_benchmarks(row, e, benches, metric)
        for k in SETTING_KEYS:
            row[k] = e.sampling.get(k)
        rows.append(row)
    return ["model", *benches, "Avg"], rows


def to_markdown(columns: list[str], rows: list[dict], *, percent: bool = True) -> str:
    """Markdown table; values as percentages with one decimal, best value per column in bold."""
    numeric = columns[1:]
    best = {c: max((r[c] for r in rows if r.get(c) is not None), default=None) for c in numeric}

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "–"
        s = f"{100 * v:.1f}" if percent else f"{v:.3f}"
        return f"**{s}**" if len(rows) > 1 and best[c] is not None and v == best[c] else s

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * len(numeric)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([str(r["model"])] + [cell(r, c) for c in numeric]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict]) -> str:
    """CSV with raw fractions and the sampling settings of every row."""
    buf = io.StringIO()
    fields = [*columns, "init", "target", *SETTING_KEYS]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


def headline_k(evals: Sequence[EvalResult], want: int = 32) -> int:
    """The pass@k of Table 2: k=32 when every model drew >= 32 samples, else the smallest n drawn."""
    ns = [int(b["n_samples"]) for e in evals for b in e.benchmarks.values()]
    if not ns:
        return want
    return want if min(ns) >= want else min(ns)


# ------------------------------------------------------------------------------------------------------------
# rho sensitivity (paper App. G, Table 8) and the global-regularisation comparison (Table 6)
# ------------------------------------------------------------------------------------------------------------
GLOBAL_REG = "global_reg"


def _recipe(tag: str) -> str:
    return tag.partition("-")[0]


def sensitivity_rows(evals: Sequence[EvalResult], method_cfg: dict[str, dict], metric: str = "avg@n",
                     *, param: str = "rho") -> tuple[list[str], list[dict]]:
    """(columns, rows) of the rho table: every evaluated model whose method has a `rho` parameter (any variant
    of eksft and its ablations), plus `global_reg` (regularisers on every token) as rho = "all". Rows are grouped
    by recipe and target, sorted by rho; `variant` is the method tag (it names any other changed setting).
    Empty when fewer than two distinct (recipe, rho) settings were evaluated: nothing to compare.
    """
    benches = benchmark_order(evals)
    rows = []
    for e in evals:
        if e.target == "base":
            continue
        method = method_cfg.get(e.init) or {}
        params = method.get("params") or {}
        recipe = _recipe(e.init)
        if param in params:
            value: float | str = float(params[param])
        elif recipe == GLOBAL_REG or method.get("loss") == GLOBAL_REG:
            value = "all"
        else:
            continue
        row: dict = {"recipe": recipe, param: value, "variant": e.init, "target": e.target,
                     "model": TARGET_NAME.get(e.target, e.target)}
        _fill_benchmarks(row, e, benches, metric)
        rows.append(row)
    if len({(r["recipe"], r[param]) for r in rows}) < 2:
        return [], []
    rank = {"sft": 0, "rl": 1}
    rows.sort(key=lambda r: (rank.get(r["target"], 2), r["recipe"] == GLOBAL_REG, r["recipe"],
                             (1, 0.0) if r[param] == "all" else (0, r[param]), r["variant"]))
    return ["recipe", param, "variant", "model", *benches, "Avg"], rows


TARGET_NAME = {"sft": "SFT", "rl": "SFT→RL", "base": "base"}


def sensitivity_markdown(columns: list[str], rows: list[dict], *, param: str = "rho") -> str:
    """Markdown of `sensitivity_rows`: percentages, best value per column and model kind in bold."""
    if not rows:
        return ""
    numeric = columns[4:]
    best = {}
    for r in rows:
        for c in numeric:
            v = r.get(c)
            if v is not None:
                best[(r["target"], c)] = max(best.get((r["target"], c), v), v)
    head = ["method", "ρ" if param == "rho" else param, "variant", "model", *numeric]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---:", "---", "---"] + ["---:"] * len(numeric)) + "|"]
    for r in rows:
        cells = []
        for c in numeric:
            v = r.get(c)
            s = "–" if v is None else f"{100 * v:.1f}"
            cells.append(f"**{s}**" if v is not None and v == best[(r["target"], c)] else s)
        p = r[param]
        p = p if isinstance(p, str) else f"{p:g}"
        lines.append(f"| {r['recipe']} | {p} | {r['variant']} | {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
# Tables of named runs: Table 3 (the regulariser ablations) and Table 9 (random masking vs EKSFT)
# ------------------------------------------------------------------------------------------------------------
# table id -> (title, the method recipes it needs, in the paper's row order). A run counts when its method tag is
# the recipe's own name (its recipe defaults, not a variant such as eksft-rho_0.1).
METHOD_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "table3": ("Table 3: ablations of the regularisers",
               ("eksft", "eksft_no_entropy_reg", "eksft_no_kl_reg", "eksft_no_reg")),
    "table9": ("Table 9: random masking vs EKSFT (App. H)", ("eksft", "random_mask")),
}
# a row shown for reference when it was run, never required
REFERENCE_METHOD = "sft"


def method_table_rows(evals: Sequence[EvalResult], methods: Sequence[str],
                      metric: str = "avg@n") -> tuple[list[str], list[dict], list[str]]:
    """(columns, rows, missing): one row per evaluated model of the named methods (SFT rows first, then SFT→RL,
    each in `methods` order, plain `sft` last as the reference when present); `missing` = the methods of
    `methods` with no evaluated model here. No rows when none of the runs the table is about was evaluated
    (every method after the first, `eksft`, which is in every such table)."""
    benches = benchmark_order(evals)
    wanted = [*methods, REFERENCE_METHOD] if REFERENCE_METHOD not in methods else list(methods)
    have = {e.init for e in evals if e.target != "base"}
    missing = [m for m in methods if m not in have]
    if all(m in missing for m in methods[1:]):
        return [], [], missing
    rows = []
    for target in ("sft", "rl"):
        for m in wanted:
            for e in evals:
                if e.init == m and e.target == target:
                    row: dict = {"model": e.label, "init": e.init, "target": e.target}
                    _fill_benchmarks(row, e, benches, metric)
                    for k in SETTING_KEYS:
                        row[k] = e.sampling.get(k)
                    rows.append(row)
    return ["model", *benches, "Avg"], rows, missing


def rho_evals(evals: Sequence[EvalResult], rows: Sequence[dict]) -> list[EvalResult]:
    """The evaluated models behind the rows of `sensitivity_rows` (for their pass@k curves)."""
    keys = {(r["variant"], r["target"]) for r in rows}
    return [e for e in evals if (e.init, e.target) in keys]
