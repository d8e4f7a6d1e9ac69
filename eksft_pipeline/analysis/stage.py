"""Stage `report`: one `report.md` (+ CSV / JSON / PNG / HTML) from one or more run directories.

    python -m eksft_pipeline stage=report                          # this model's run dir
    make report                                                    # the same
    python -m eksft_pipeline stage=report 'report.run_dirs=[runs/qwen3-8b,runs/qwen3-8b-ablations]'

Written to `<run_dir>/report/`:

    report.md                 tables and figures embedded, every stage's numbers, the settings
    table_pass1.{md,csv}      Table 1: avg@n (= pass@1) per benchmark and their mean
    table_passk.{md,csv}      Table 2: unbiased pass@k at k = 32 (or the n drawn when smaller)
    fig1_base_vs_sft.png      Fig. 1: pass@k of the base model ("Original Model") vs each SFT model
    table3.{md,csv}           Table 3: eksft and its regulariser ablations (no entropy / no KL / neither)
    table9.{md,csv}           Table 9: random masking (App. H) vs EKSFT
    table_rho{,_passk}.{md,csv}   Table 8: rho sensitivity at pass@1 and pass@32 (or the n drawn); rho_pass_at_k.png
    pass_at_k.png             pass@k vs k, log axis, one line per model (Figure 2)
    drift.png                 parameter drift per SFT method (Figures 4-5)
    sft_curves.png            IoU(M_H, M_KL), |M|/|T|, mean H / KL over M and T, loss per step
    iou_table.md              mean IoU and |M|/|T| over the first / middle / last third of SFT (Table 7)
    rl_curves.png             DAPO score / response length / entropy per step
    rl_val_curves.png         benchmark pass@1 per DAPO step (rl.val_every) per method, beside the reward
    rl_mismatch.png           rollout-vs-trainer log-prob mismatch per DAPO step (+ the rollout correction's weights)
    case_study/token_probs.{html,png,json}   gold-token probabilities per model (Figure 6)
    report.json               everything above as data

One function per report section (`section_results`, `section_sft`, `section_rl`, `section_case_study`,
`section_claims`, `section_tracking`, `section_stages`), each `(Report) -> markdown lines`, adding its files,
figures and tables to the `Report` it is given; `ReportStage.run` only orders them.

Tracking (contract/tracking.py): the "Tracking" section lists every stage's tracker run (backend, name, id,
group, link or offline folder and the `wandb sync` command). With tracking on, the report itself is a tracker
run (`report`) holding its figures (pass@k curves, drift, selection / IoU curves, DAPO curves, the
token-probability case study) and tables. `report.source=tracker` reads the SFT and DAPO training curves from
the tracker's history (W&B; offline runs from their local `.wandb` files) instead of the metrics files; a stage
without a readable tracker run falls back to its files, and the report says which.

The report re-runs whenever an input file changes (a new method in the sweep, a re-run stage).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eksft_pipeline.analysis.gather import RunData, gather
from eksft_pipeline.contract.artifacts import atomic_write_text
from eksft_pipeline.contract.manifest import Manifest, resolve_recorded
from eksft_pipeline.contract.recipes import plain
from eksft_pipeline.contract.stage_api import ConfigError, Stage, StageContext, StageResult


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


# IoU(M_H, M_KL) as the trainer logs it. Per sequence: each sequence's own IoU, averaged over the sequences of
# the step -- how the authors compute it only under selection_scope=sequence (eksft_official: the selection
# itself per sequence); under the paper's global scope it is the global selection seen sequence by sequence;
# batch: the IoU of the step's batch selection (the paper's equations; `eksft/iou` is the older name of it --
# under selection_scope=micro_batch it is the token-weighted mean of the micro-batches' IoUs).
IOU_KEYS = (("per sequence", ("eksft/iou_seq_mean",)), ("batch", ("eksft/iou_batch", "eksft/iou")))
PHASES = ("early", "middle", "late")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def iou_table(sft_metrics: dict[str, dict[int, dict]]) -> tuple[str, dict]:
    """IoU(M_H, M_KL) per method (paper App. F, Table 7): mean over training steps and over the early / middle /
    late third of them, per sequence and / or over the batch (whichever the trainer logged).

    Step 1 is left out: there pi_theta = pi_ref and every KL is 0 (by definition, in any precision:
    losses/selection.py, rule 1), so M_KL is empty (eksft and the paper's ablations: IoU 0) or k tokens drawn by
    tie-breaking among zero scores (eksft_official, the authors' rule); either way its IoU says nothing about the
    criteria. Also reported: the mean |M|/|T|.
    """
    data: dict[str, dict] = {}
    for method, steps in sorted(sft_metrics.items()):
        for unit, keys in IOU_KEYS:
            key = next((k for k in keys if any(k in m for m in steps.values())), None)
            if key is None:
                continue
            xs = [s for s, m in steps.items() if key in m and s > 1]
            if not xs:
                continue
            n = len(xs)
            cuts = [0, round(n / 3), round(2 * n / 3), n]
            row: dict = {"metric": key, "steps": n, "first_step_left_out": 1 in steps,
                         "iou_mean": _mean([steps[s][key] for s in xs])}
            for i, name in enumerate(PHASES):
                row[f"iou_{name}"] = _mean([steps[s][key] for s in xs[cuts[i]:cuts[i + 1]]])
            row["mask_frac_mean"] = _mean([steps[s]["eksft/mask_frac"] for s in xs if "eksft/mask_frac" in steps[s]])
            data.setdefault(method, {})[unit] = row
    if not data:
        return "", {}
    cols = ["iou_mean", *(f"iou_{p}" for p in PHASES), "mask_frac_mean"]
    head = ["mean IoU", *(f"IoU {p}" for p in PHASES), "mean \\|M\\|/\\|T\\|"]
    lines = ["| method | IoU over | steps | " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for m, units in data.items():
        for unit, row in units.items():
            lines.append(f"| {m} | {unit} (`{row['metric']}`) | {row['steps']} | "
                         + " | ".join("–" if row[c] is None else f"{row[c]:.3f}" for c in cols) + " |")
    note = ("\nMean over SFT steps 2..T (step 1 left out: pi_theta = pi_ref there and every KL is 0, so M_KL is "
            "empty -- eksft and the paper's ablations -- or drawn by tie-breaking among zero scores -- "
            "eksft_official, the authors' rule); early / middle / late = the three thirds of those steps. "
            "*Per sequence*: IoU of each sequence's M_H and M_KL, averaged over the step's sequences; it is how "
            "the authors compute it (paper App. F: about 0.50 at rho = 0.2) only under selection_scope=sequence "
            "(eksft_official), where the selection itself is per sequence; under the paper's global scope the masks "
            "are the global batch's top-k, seen sequence by sequence. *Batch*: IoU of the step's batch-level "
            "selection.\n")
    return "\n".join(lines) + "\n" + note, data


def stage_lines(data: RunData) -> list[str]:
    """One line per manifest entry: status, wall time and its summary numbers."""
    lines = ["| stage | status | wall (s) | numbers |", "|---|---|---:|---|"]
    for key, e in data.stages.items():
        rd, _, k = key.partition("::")
        if k == "report":  # this stage itself: still running while it writes
            continue
        name = k if len(data.run_dirs) == 1 else f"{Path(rd).name}:{k}"
        # scalars and flat dicts; nested structures (per-benchmark details) live in report.json
        summ = {a: b for a, b in (e.get("summary") or {}).items()
                if a != "wall_time_s" and not isinstance(b, list)
                and not (isinstance(b, dict) and any(isinstance(x, dict | list) for x in b.values()))}
        nums = "; ".join(f"{a}: {_fmt(b)}" for a, b in summ.items())
        nums = nums.replace("|", "\\|")
        wall = (e.get("summary") or {}).get("wall_time_s", "")
        lines.append(f"| {name} | {e.get('status')} | {wall} | {nums[:900]} |")
    return lines


def drift_precision_lines(drift: dict[str, dict]) -> list[str]:
    """The precision the drift numbers above use, and the same table with both sides rounded to bf16."""
    dtypes = sorted({f"{m}: {', '.join(d.get('stored_dtype', {}).get('model', ['?']))} vs reference "
                     f"{', '.join(d.get('stored_dtype', {}).get('reference', ['?']))}" for m, d in drift.items()})
    lines = ["Precision: the table above compares the weights as stored, in fp32 arithmetic (" + "; ".join(dtypes)
             + "). The paper's App. C compares the authors' bf16 checkpoints; below, both sides rounded to bf16 "
             "first (changes under half a bf16 ulp, about 0.2% relative, disappear).", ""]
    bf = {m: (d.get("by_precision") or {}).get("bf16") for m, d in drift.items()}
    bf = {m: o for m, o in bf.items() if o}
    if bf:
        taus = sorted(next(iter(bf.values()))["frac_over"], key=float)
        lines += ["| method (bf16) | relative L2 change | " + " | ".join(f"> {t}" for t in taus) + " |",
                  "|---|---:|" + "---:|" * len(taus)]
        for m, o in sorted(bf.items()):
            lines.append(f"| {m} | {o['rel_norm']:.4f} | " + " | ".join(f"{100 * o['frac_over'][t]:.1f}%" for t in taus)
                         + " |")
        lines.append("")
    return lines


@dataclass
class Report:
    """What the sections build: the markdown is returned by each section; files, figures and tables go here."""

    ctx: StageContext
    data: RunData
    out: Path
    outputs: dict[str, str] = field(default_factory=dict)
    everything: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)  # tracker name -> PNG
    tables: dict[str, tuple[list[str], list[dict]]] = field(default_factory=dict)  # tracker name -> (cols, rows)

    @property
    def cfg(self):
        return self.ctx.cfg

    def figure(self, name: str, path: Path | None) -> Path | None:
        if path:
            self.outputs[f"{name}_png"] = str(path)
            self.figures[name] = Path(path)
        return path


def section_results(r: Report) -> list[str]:
    """Tables 1-2 (avg@n, pass@k; the base model as "Original Model"), Fig. 1 (base vs SFT), Tables 3 and 9,
    CIs and majority vote, what each stage moved, Table 8, pass@k curves, the verifier audit."""
    from eksft_pipeline.analysis import plots
    from eksft_pipeline.analysis.compare import movement_table, movements
    from eksft_pipeline.analysis.tables import headline_k, result_rows, to_csv, to_markdown
    from eksft_pipeline.analysis.verifier_audit import audit_section

    data, out, cfg = r.data, r.out, r.cfg
    if not data.evals:
        return ["## Results", "", "_No completed eval stage in these run directories._", ""]
    s = data.evals[0].sampling
    md = ["## Results", "",
          f"Sampling: n={s.get('n')}, temperature={s.get('temperature')}, top_p={s.get('top_p')}, "
          f"max response tokens={s.get('max_new_tokens')}, backend={s.get('backend')}. "
          "Scores: math-verify reward on the last `\\boxed{}` (the RL reward). Avg = mean over "
          "benchmarks. Best per column in bold.", ""]
    k = headline_k(data.evals)
    for fname, metric, title in (("table_pass1", "avg@n", "Table 1: avg@n = pass@1 (%)"),
                                 ("table_passk", f"pass@{k}", f"Table 2: pass@{k} (%), unbiased estimator")):
        cols, rows = result_rows(data.evals, metric)
        tmd = to_markdown(cols, rows)
        (out / f"{fname}.md").write_text(tmd)
        (out / f"{fname}.csv").write_text(to_csv(cols, rows))
        r.outputs[fname] = str(out / f"{fname}.csv")
        r.tables[fname] = (cols, rows)
        md += [f"### {title}", "", tmd]
        r.everything[fname] = {"metric": metric, "rows": rows}
    if not any(e.target == "base" for e in data.evals):
        md += ["_Original Model rows (and Fig. 1) missing: the base model was not evaluated; add `base` to "
               "`eval.targets` (the paper-scale recipes do)._", ""]
    md += _figure1(r)
    md += _method_tables(r)
    ci_lines = ["| model | benchmark | pass@1 | 95% CI (bootstrap over problems) | maj@n | problems |",
                "|---|---|---:|---|---:|---:|"]
    for e in data.evals:
        for b, m in sorted(e.benchmarks.items()):
            n = str(m["n_samples"])
            lo, hi = m["pass@k_ci95"].get("1", [None, None])
            ci = f"[{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else "–"
            maj = m["maj@k"].get(n)
            ci_lines.append(f"| {e.label} | {b} | {100 * m['avg@n']:.1f} | {ci} | "
                            f"{'–' if maj is None else f'{100 * maj:.1f}'} | {m['n_problems']} |")
    md += ["### Confidence intervals and majority vote", "", *ci_lines, ""]
    mv = movements(data.evals, n_boot=int(cfg.eval.get("bootstrap", 1000)), seed=int(cfg.seed))
    if mv:
        table = movement_table(mv)
        (out / "table_movement.md").write_text(table)
        r.outputs["table_movement"] = str(out / "table_movement.md")
        md += ["### What each stage moved", "",
               "pass@1 = mean over benchmarks of avg@n; Δ and its 95% CI from a paired bootstrap over problems "
               "(the same problems for both models, resampled per benchmark).", "", table]
        r.everything["movements"] = mv
    md += _table8(r)
    if r.figure("pass_at_k", plots.plot_pass_at_k(data.evals, out / "pass_at_k.png")):
        md += ["### pass@k curves", "", "![pass@k](pass_at_k.png)", ""]
    r.everything["evals"] = [{"label": e.label, "init": e.init, "target": e.target, "run_dir": e.run_dir,
                              "metrics": e.metrics} for e in data.evals]
    lines, audit = audit_section(data.evals)
    r.everything["verifier_audit"] = audit
    return md + lines


def _figure1(r: Report) -> list[str]:
    """Fig. 1: pass@k of the base model against each method's SFT model."""
    from eksft_pipeline.analysis import plots

    evals = [e for e in r.data.evals if e.target in ("base", "sft")]
    if not any(e.target == "base" for e in evals) or not any(e.target == "sft" for e in evals):
        return []
    if not r.figure("fig1_base_vs_sft", plots.plot_pass_at_k(evals, r.out / "fig1_base_vs_sft.png")):
        return []
    return ["### Fig. 1: pass@k, Original Model vs SFT", "", "![base vs SFT](fig1_base_vs_sft.png)", ""]


def _method_tables(r: Report) -> list[str]:
    """Table 3 (the regulariser ablations) and Table 9 (random masking vs EKSFT), each from its named runs; a
    table with runs missing lists them (and how to add them)."""
    from eksft_pipeline.analysis.tables import METHOD_TABLES, method_table_rows, to_csv, to_markdown

    md: list[str] = []
    for fname, (title, methods) in METHOD_TABLES.items():
        cols, rows, missing = method_table_rows(r.data.evals, methods)
        add = (f"missing runs: {', '.join(f'`{m}`' for m in missing)} (add them: "
               f"`python -m eksft_pipeline -m stage=train_eval method={','.join(missing)}` into this run "
               "directory)") if missing else ""
        r.everything[fname] = {"methods": list(methods), "missing": missing, "rows": rows}
        if not rows:
            md += [f"### {title}", "", f"_Not produced: {add}._", ""]
            continue
        table = to_markdown(cols, rows)
        (r.out / f"{fname}.md").write_text(table)
        (r.out / f"{fname}.csv").write_text(to_csv(cols, rows))
        r.outputs[fname] = str(r.out / f"{fname}.csv")
        r.tables[fname] = (cols, rows)
        md += [f"### {title}: avg@n = pass@1 (%)", "", table]
        if missing:
            md += [f"_Incomplete: {add}._", ""]
    return md


def _table8(r: Report) -> list[str]:
    """Table 8: rho sensitivity at pass@1 and pass@K (K = 32, or the fewest samples drawn by these runs), the
    global-regularisation row (Table 6) as rho = all, and the pass@k curves of every rho."""
    from eksft_pipeline.analysis import plots
    from eksft_pipeline.analysis.tables import (
        headline_k,
        rho_evals,
        sensitivity_markdown,
        sensitivity_rows,
        to_csv,
    )

    data, out = r.data, r.out
    cols, rows = sensitivity_rows(data.evals, data.method_cfg)
    if not rows:
        r.everything["table_rho_missing"] = "eksft at two or more values of rho"
        return ["### Table 8: ρ sensitivity", "",
                "_Not produced: needs eksft evaluated at two or more values of ρ (a multirun: `python -m "
                "eksft_pipeline -m stage=train_eval method=eksft method.params.rho=0,0.1,0.2,0.3,0.4`)._", ""]
    evals = rho_evals(data.evals, rows)
    k = headline_k(evals)
    md = ["### Table 8: ρ sensitivity (and global regularisation, Table 6)", "",
          "Every evaluated variant of a method with a ρ parameter (a multirun over `method.params.rho`; "
          "ρ = 0 is plain SFT), and `global_reg` (the regularisers on every token) as ρ = all."
          + ("" if k == 32 else f" pass@{k}: these runs drew {k} samples per problem, fewer than the paper's 32."),
          ""]
    everything = {}
    for fname, metric, title in (("table_rho", "avg@n", "avg@n = pass@1 (%)"),
                                 ("table_rho_passk", f"pass@{k}", f"pass@{k} (%)")):
        c, rs = sensitivity_rows(data.evals, data.method_cfg, metric)
        table = sensitivity_markdown(c, rs)
        (out / f"{fname}.md").write_text(table)
        (out / f"{fname}.csv").write_text(to_csv(c, rs))
        r.outputs[fname] = str(out / f"{fname}.csv")
        r.tables[fname] = (c, rs)
        md += [f"#### {title}", "", table]
        everything[metric] = rs
    r.everything["table_rho"] = rows
    r.everything["table_rho_passk"] = {"k": k, "rows": everything[f"pass@{k}"]}
    if r.figure("rho_pass_at_k", plots.plot_pass_at_k(evals, out / "rho_pass_at_k.png")):
        md += ["#### pass@k of every ρ", "", "![pass@k per rho](rho_pass_at_k.png)", ""]
    return md


def schedule_lines(method_cfg: dict[str, dict]) -> list[str]:
    """Which PSFT schedule each PSFT run used (recipes/method/psft.yaml, psft_hybrid.yaml), from its recorded
    method config: pi_old refreshed every k updates within the others' budget, or u updates per batch."""
    lines = []
    for tag, m in sorted(method_cfg.items()):
        if m.get("loss") != "psft":
            continue
        every, u = int(m.get("pi_old_every", 1) or 1), int(m.get("updates_per_batch", 1) or 1)
        if u > 1:
            what = (f"hybrid schedule: {u} optimizer updates per batch (each on 1/{u} of it) with pi_old taken at "
                    f"the start of the batch -- {u}x the optimizer updates of the other methods at the same "
                    "learning rate")
        else:
            what = (f"the other methods' budget (one optimizer update per batch, the same learning rate), pi_old "
                    f"refreshed every {every} update{'s' if every > 1 else ''}")
        lines.append(f"- `{tag}`: {what}.")
    return ["PSFT schedule:", "", *lines, ""] if lines else []


def section_sft(r: Report) -> list[str]:
    """Parameter drift (Figs. 4-5, both precisions), selection statistics over training, the IoU table (Table 7)."""
    from eksft_pipeline.analysis import plots

    data, out = r.data, r.out
    md = ["## SFT analysis", "", *schedule_lines(data.method_cfg)]
    if r.figure("drift", plots.plot_drift(data.drift, out / "drift.png")):
        taus = sorted(next(iter(data.drift.values()))["overall"]["frac_over"], key=float)
        md += ["### Parameter drift vs the reference model", "", "![drift](drift.png)", "",
               "| method | relative L2 change | " + " | ".join(f"> {t}" for t in taus) + " |",
               "|---|---:|" + "---:|" * len(taus)]
        rows = []
        for mth, d in sorted(data.drift.items()):
            fo = d["overall"]["frac_over"]
            md.append(f"| {mth} | {d['overall']['rel_norm']:.4f} | "
                      + " | ".join(f"{100 * fo[t]:.1f}%" for t in sorted(fo, key=float)) + " |")
            rows.append({"method": mth, "rel_norm": d["overall"]["rel_norm"],
                         **{f"frac_over_{t}": fo[t] for t in sorted(fo, key=float)}})
        r.tables["drift"] = (list(rows[0]), rows)
        md.append("")
        md += drift_precision_lines(data.drift)
        r.everything["drift"] = {m: d["overall"] for m, d in data.drift.items()}
        r.everything["drift_by_precision"] = {m: d.get("by_precision") for m, d in data.drift.items()}
    if r.figure("sft_curves", plots.plot_sft_curves(data.sft_metrics, out / "sft_curves.png")):
        md += ["### Selection statistics over training", "", "![sft curves](sft_curves.png)", ""]
    table, iou = iou_table(data.sft_metrics)
    if table:
        (out / "iou_table.md").write_text(table)
        md += ["### IoU(M_H, M_KL) over training (Table 7)", "", table]
        r.everything["iou"] = iou
        rows = [{"method": m, "unit": u, **row} for m, units in iou.items() for u, row in units.items()]
        r.tables["iou"] = (list(rows[0]), rows)
    return md


def _rl_summaries(data: RunData) -> dict[str, dict]:
    """init -> the RL stage's manifest summary (the last run directory's wins)."""
    out = {}
    for k, entry in data.stages.items():
        key = k.split("::", 1)[1]
        if key.startswith("rl/") and entry.get("status") == "complete":
            out[key.split("/", 1)[1]] = entry.get("summary") or {}
    return out


def _correction_setting(corr: dict) -> str:
    """The rollout correction an RL stage recorded, in words: its preset, "off", or the hand-set fields."""
    if not corr:
        return "not recorded"
    if corr.get("preset"):
        return str(corr["preset"])
    if not (corr.get("rollout_is") or corr.get("rollout_rs") or corr.get("bypass_mode")):
        return "off"
    return ", ".join(f"{k}={corr[k]}" for k in ("rollout_is", "rollout_is_threshold", "rollout_rs",
                                               "rollout_rs_threshold", "bypass_mode") if corr.get(k))


def section_rl(r: Report) -> list[str]:
    """DAPO curves (score, response length, entropy per step), benchmark pass@1 per step (verl's validation,
    `rl.val_every`) beside the final eval, and the rollout-vs-trainer mismatch with the rollout correction's setting."""
    from eksft_pipeline.analysis import plots
    from eksft_pipeline.contract.rl_curves import mismatch_keys, val_curves, val_n

    data, out = r.data, r.out
    md: list[str] = []
    if r.figure("rl_curves", plots.plot_rl_curves(data.rl_metrics, out / "rl_curves.png")):
        md += ["## DAPO", "", "![rl curves](rl_curves.png)", ""]
    if not data.rl_metrics:
        return md
    if not md:
        md = ["## DAPO", ""]
    summaries = _rl_summaries(data)
    if r.figure("rl_val_curves", plots.plot_rl_val_curves(data.rl_metrics, out / "rl_val_curves.png")):
        final = {(e.init, b): m for e in data.evals if e.target == "rl" for b, m in e.benchmarks.items()}
        lines = ["| method (init) | benchmark | n | steps | pass@1 at step 0 | pass@1 at the last step | "
                 "final eval avg@n (n) |", "|---|---|---:|---|---:|---:|---:|"]
        rows = []
        for init, steps in sorted(data.rl_metrics.items()):
            n = val_n(steps)
            for bench, c in sorted(val_curves(steps).items()):
                pts = sorted(c)
                fe = final.get((init, bench))
                fin = f"{100 * fe['avg@n']:.1f} ({fe['n_samples']})" if fe else "–"
                first = f"{100 * c[0]:.1f}" if 0 in c else "–"
                lines.append(f"| {init} | {bench} | {n} | {pts[0]}..{pts[-1]} ({len(pts)} points) | {first} | "
                             f"{100 * c[pts[-1]]:.1f} | {fin} |")
                rows.append({"init": init, "benchmark": bench, "n": n, "curve": {str(s): c[s] for s in pts},
                             "final_eval_avg@n": fe["avg@n"] if fe else None})
        md += ["### Benchmark pass@1 during DAPO", "",
               "verl's own validation every `rl.val_every` steps (and before the first): pass@1 = mean over problems "
               "of the accuracy of n samples each, the eval stage's problems and temperature, scored by the RL "
               "reward. Step 0 is the SFT model; the last step's point is the model the eval stage scores as "
               "SFT→RL (its avg@n, with more samples, in the last column).", "",
               "![rl val curves](rl_val_curves.png)", "", *lines, ""]
        r.everything["rl_val_curves"] = rows
    if r.figure("rl_mismatch", plots.plot_rl_mismatch(data.rl_metrics, out / "rl_mismatch.png")):
        keys = mismatch_keys({i: m for st in data.rl_metrics.values() for i, m in enumerate(st.values())})
        lines = ["| method (init) | rollout correction | " + " | ".join(t.replace("|", "\\|") for _, t in keys) + " |",
                 "|---|---|" + "---:|" * len(keys)]
        rows = []
        for init, steps in sorted(data.rl_metrics.items()):
            corr = summaries.get(init, {}).get("rollout_correction") or {}
            setting = _correction_setting(corr)
            means = {}
            for k, _ in keys:
                vals = [m[k] for s, m in steps.items() if s > 0 and m.get(k) is not None]
                means[k] = sum(vals) / len(vals) if vals else None
            lines.append(f"| {init} | {setting} | " + " | ".join("–" if v is None else f"{v:.3g}"
                                                                   for v in means.values()) + " |")
            rows.append({"init": init, "rollout_correction": corr or None, "mean_over_steps": means})
        md += ["### Rollout vs trainer log-probs", "",
               "How far the rollout engine's log-probabilities of the sampled tokens are from the trainer's "
               "(verl's `rollout_corr/*` and `training/rollout_probs_diff_*`, per DAPO step; table: mean over steps), "
               "and the rollout correction that ran (`rl.rollout_correction`; off = DAPO as published).", "",
               "![rl mismatch](rl_mismatch.png)", "", *lines, ""]
        r.everything["rl_mismatch"] = rows
    return md


def section_claims(r: Report) -> list[str]:
    """The paper's qualitative claims, measured on this run (EKSFT vs SFT)."""
    from eksft_pipeline.analysis.claims import qualitative_claims

    lines, claims = qualitative_claims(r.data, r.everything.get("entropy"),
                                       n_boot=int(r.cfg.eval.get("bootstrap", 1000)), seed=int(r.cfg.seed))
    if not lines:
        return []
    r.everything["claims"] = claims
    return ["## The paper's qualitative claims on this run (EKSFT vs SFT)", "",
            "Measured here, not assumed; see `eksft_pipeline/analysis/claims.py` for each measure.", "", *lines, ""]


def _local_run(run_dir: Path, backend: str, folder: str, run_id: str) -> str:
    """Where a run's local files are: the W&B run folder(s) of `run_id` when present, else the backend's folder."""
    from eksft_pipeline.contract.tracking import wandb_run_dirs

    root = Path(folder) if Path(folder).is_absolute() else run_dir / folder
    if backend == "wandb":
        found = wandb_run_dirs(root, run_id)
        if found:
            return "wandb: " + ", ".join(f"`{d}`" for d in found)
    return f"{backend}: `{root}`"


def tracking_rows(data: RunData) -> list[dict[str, Any]]:
    """One row per tracker run recorded in the manifests (eval: one per target model)."""
    rows = []
    for key, e in data.stages.items():
        rd, _, k = key.partition("::")
        rec = e.get("tracking")
        if not rec:
            continue
        # eval logs one run per target model (summary `tracking_runs`); its own id only names them
        subs = (e.get("summary") or {}).get("tracking_runs") or {}
        runs = [(sub["name"], sub["run_id"]) for _t, sub in sorted(subs.items())] or [(rec["name"], rec["run_id"])]
        for name, run_id in runs:
            where = rec.get("url") if run_id == rec["run_id"] else None
            if not where and rec.get("url"):
                where = rec["url"].rsplit("/", 1)[0] + f"/{run_id}"
            if not where:
                where = ", ".join(_local_run(Path(rd), b, d, run_id) for b, d in (rec.get("dirs") or {}).items())
            rows.append({"run_dir": rd, "stage": k, "status": e.get("status"), "name": name, "run_id": run_id,
                         "group": rec.get("group"), "backends": "+".join(rec.get("backends") or []),
                         "mode": rec.get("mode"), "where": where, "resumed": bool(rec.get("resumed"))})
    return rows


def section_tracking(r: Report, own: Any = None) -> list[str]:
    """Every stage's tracker run (name, id, group, link or local folder) and how to upload offline W&B runs;
    `own` is the report's own identity (tracking on)."""
    rows = tracking_rows(r.data)
    if own is not None:  # this stage's own entry is listed from `own` (its manifest entry is still running)
        here = str(Path(r.ctx.run_dir).resolve())
        rows = [x for x in rows if not (x["stage"] == r.ctx.key and str(Path(x["run_dir"]).resolve()) == here)]
        rows.append({"run_dir": str(r.ctx.run_dir), "stage": "report", "status": "running", "name": own.name,
                     "run_id": own.run_id, "group": own.group, "backends": "+".join(own.backends), "mode": own.mode,
                     "where": own.url or ", ".join(f"{b}: `{d}`" for b, d in own.dirs.items()),
                     "resumed": own.resumed})
    r.everything["tracking"] = {"groups": r.data.tracking_groups, "runs": rows}
    if not rows:
        return []
    groups = sorted({str(x["group"]) for x in rows})
    md = ["## Tracking", "", f"Group{'s' if len(groups) > 1 else ''}: " + ", ".join(f"`{g}`" for g in groups)
          + f" (project `{r.cfg.tracking.get('project', 'eksft-pipeline')}`).", "",
          "| stage | run | id | backends | where |", "|---|---|---|---|---|"]
    for x in rows:
        label = x["stage"] if len(r.data.run_dirs) == 1 else f"{Path(x['run_dir']).name}:{x['stage']}"
        md.append(f"| {label} | {x['name']} | `{x['run_id']}`{' (resumed)' if x['resumed'] else ''} | "
                  f"{x['backends']} ({x['mode'] or '-'}) | {x['where']} |")
    if any(x["mode"] == "offline" for x in rows):
        md += ["", "Offline W&B runs: upload them with `wandb sync <run_dir>/tracking/wandb/offline-run-*`."]
    if r.data.tracker_notes:
        md += ["", "Training curves (`report.source=tracker`): " + "; ".join(r.data.tracker_notes) + "."]
    return [*md, ""]


def section_stages(r: Report) -> list[str]:
    """One line per manifest entry: status, wall time, its numbers."""
    cutoff = []
    if r.data.split:
        r.everything["split"] = r.data.split
        if r.data.split.get("cutoff"):  # the split stage's measurement of the SFT length cutoff on its data
            cutoff = [f"SFT length cutoff: {r.data.split['cutoff']}.", ""]
    r.everything["stages"] = r.data.stages
    return ["## Every stage", "", *cutoff, *stage_lines(r.data), ""]


def _split_run_format(r: Report):
    """The run format (contract/run_format.py) of the run directory the split came from: the report's own
    (`ctx.run_format`), or, reporting over `report.run_dirs`, that directory's."""
    ctx = r.ctx
    rd = r.data.split_run_dir
    if rd is not None and Path(rd).resolve() != Path(ctx.run_dir).resolve():
        ctx = StageContext(cfg=ctx.cfg, run_dir=Path(rd), manifest=Manifest(Path(rd)), key=ctx.key)
    return ctx.run_format


def section_case_study(r: Report) -> list[str]:
    """Token-probability case study (the paper's Fig. 6) and the mean token entropy per model."""
    import pandas as pd

    from eksft_pipeline.analysis.case_study import token_prob_case_study

    cs = r.cfg.report.get("case_study") or {}
    if not cs.get("enabled", True):
        return []
    data, out = r.data, r.out
    src = (data.split or {}).get("sft_train")
    if not src or not Path(src).exists():
        return ["## Token-probability case study", "", "_Skipped: no SFT split or no models._", ""]
    fmt = _split_run_format(r)  # the generation prefix and the base model's directory, as the split recorded them
    models = dict(data.models)
    try:
        models["base"] = str(fmt.base_model_dir())
    except FileNotFoundError:
        models.pop("base", None)
    order = ["base"] + sorted(k for k in models if k.endswith("(SFT)")) + sorted(
        k for k in models if k.endswith("(SFT→RL)"))
    models = {k: models[k] for k in order if k in models}
    if not models:
        return ["## Token-probability case study", "", "_Skipped: no SFT split or no models._", ""]
    idx = int(cs.get("example_index", 0))
    row = pd.read_parquet(src).iloc[idx]
    messages = [dict(m) for m in row["messages"]]
    device = str(cs.get("device", "cpu"))
    res = token_prob_case_study(models, messages, out / "case_study", device=device,
                                generation_prefix=fmt.generation_prefix,
                                max_tokens=int(cs.get("max_tokens", 96)))
    r.outputs["case_study_html"] = str(out / "case_study" / "token_probs.html")
    if (out / "case_study" / "token_probs.png").is_file():
        r.figures["case_study_token_probs"] = out / "case_study" / "token_probs.png"
    r.everything["case_study"] = {"example_index": idx, "mean_prob": res["mean_prob"]}
    lines = ["## Token-probability case study", "",
             f"SFT example #{idx}: probability of each gold token of the reference solution under each model, "
             "drawn as in the paper's Fig. 6: darker red = higher probability "
             "([interactive HTML](case_study/token_probs.html)).", "",
             "![token probabilities](case_study/token_probs.png)", ""]
    # entropy kept: the same teacher-forced pass over the first n SFT examples, identical tokens for every model
    n_ent = int(cs.get("n_entropy_examples", 0) or 0)
    entropy: dict[str, float] = {}
    if n_ent > 0:
        from transformers import AutoTokenizer

        from eksft_pipeline.analysis.case_study import mean_response_entropy, render_case

        tok = AutoTokenizer.from_pretrained(next(iter(models.values())))
        prefix = fmt.generation_prefix
        frame = pd.read_parquet(src)
        cases = [render_case(tok, [dict(m) for m in rr], prefix) for rr in frame["messages"].head(n_ent)]
        entropy = {k: mean_response_entropy(v, cases, device=device) for k, v in models.items()}
        r.everything["entropy"] = entropy
        r.everything["case_study"]["n_entropy_examples"] = len(cases)
    lines += ["| model | mean p(gold token), this example | "
              + (f"mean token entropy (nats), first {n_ent} SFT examples |" if entropy else ""),
              "|---|---:|" + ("---:|" if entropy else "")]
    lines += [f"| {k} | {v:.3f} |" + (f" {entropy[k]:.4f} |" if entropy else "") for k, v in res["mean_prob"].items()]
    rows = [{"model": k, "mean_p_gold": v, **({"mean_entropy": entropy[k]} if entropy else {})}
            for k, v in res["mean_prob"].items()]
    if rows:
        r.tables["case_study"] = (list(rows[0]), rows)
    return [*lines, ""]


def log_report(identity, r: Report) -> None:
    """The report's figures (as images) and tables to its tracker run (`report`)."""
    import pandas as pd

    from eksft_pipeline.contract.tracking import StageRun

    with StageRun(identity, config={"run_dirs": r.data.run_dirs}) as run:
        for name, path in r.figures.items():
            run.image(name, path)
        for name, (cols, rows) in r.tables.items():
            run.table(name, pd.DataFrame(rows, columns=cols))
        run.summary({"n_models": len(r.data.evals), "n_sft_methods": len(r.data.sft_metrics),
                     "report_md": str(r.out / "report.md")})


class ReportStage(Stage):
    name = "report"
    tracked = True  # the report run: its figures and tables (log_report)

    def config(self, cfg):
        return {"report": plain(cfg.report), "model": str(cfg.model.path)}

    def _run_dirs(self, ctx: StageContext) -> list[Path]:
        dirs = [Path(str(d)).expanduser().resolve() for d in (ctx.cfg.report.get("run_dirs") or [ctx.run_dir])]
        return dirs or [ctx.run_dir]

    def inputs(self, ctx):
        """Every file the report reads, so that a changed or added result re-runs it."""
        inp = {}
        for rd in self._run_dirs(ctx):
            m = rd / "manifest.json"
            if not m.exists():
                continue
            try:
                stages = json.loads(m.read_text()).get("stages", {})
            except ValueError as err:
                raise ConfigError(f"report.run_dirs: {m} is not valid JSON ({err})") from None
            for key, e in stages.items():
                if key == "report" or e.get("status") != "complete":
                    continue
                for name, o in (e.get("outputs") or {}).items():
                    path = resolve_recorded(rd, o["path"])
                    if name.endswith(("metrics", "drift")) and Path(path).is_file():
                        inp[f"{rd.name}:{key}:{name}"] = path
        return inp

    def check(self, ctx):
        source = str(ctx.cfg.report.get("source", "files") or "files")
        if source not in ("files", "tracker"):
            raise ConfigError(f"report.source={source!r} must be 'files' (the metrics files) or 'tracker' "
                              "(the training curves from the W&B history)")
        if ctx.dry_run:
            return
        missing = [str(d) for d in self._run_dirs(ctx) if not (d / "manifest.json").exists() and d != ctx.run_dir]
        if missing:
            raise ConfigError(f"report.run_dirs: no manifest.json in {', '.join(missing)}; list run directories "
                              "this pipeline wrote")
        # a result whose file was damaged after it completed (Manifest.verify_inputs marked it): re-run that stage
        # first -- a report made now would silently drop it, and the previous report would be gone
        from eksft_pipeline.contract.manifest import rerun_hint

        for d in self._run_dirs(ctx):
            m = d / "manifest.json"
            try:
                stages = json.loads(m.read_text()).get("stages", {}) if m.exists() else {}
            except ValueError:
                continue  # named by inputs()
            for key, e in stages.items():
                why = str(e.get("stale_reason") or "")
                if e.get("status") == "stale" and why.startswith("file "):
                    raise ConfigError(f"stage {key} of {d} is stale: {why}; re-run {rerun_hint(key)} first "
                                      "(the previous report is kept)")

    def validate(self, ctx):
        """Every input file parses, BEFORE the previous report is removed (a truncated metrics.json is named
        here, the old report stays)."""
        self.check(ctx)
        if ctx.dry_run:
            return
        for name, path in self.inputs(ctx).items():
            try:
                json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"report input {path} ({name}) is unreadable ({type(e).__name__}: {e}); re-run the "
                                  "stage that wrote it -- the previous report is kept") from None

    def describe(self, ctx):
        return {"stage": "report", "run_dirs": [str(d) for d in self._run_dirs(ctx)],
                "out": str(ctx.out_dir / "report.md")}

    def run(self, ctx: StageContext) -> StageResult:
        from eksft_pipeline.contract.tracking import identity_of

        cfg = ctx.cfg
        out = ctx.out_dir
        out.mkdir(parents=True, exist_ok=True)
        data = gather(self._run_dirs(ctx), source=str(cfg.report.get("source", "files") or "files"))
        r = Report(ctx=ctx, data=data, out=out, everything={"run_dirs": data.run_dirs})
        ident = identity_of(ctx)
        md: list[str] = [f"# eksft-pipeline report: {cfg.model.name}", "",
                         "Run directories: " + ", ".join(f"`{d}`" for d in data.run_dirs), ""]
        md += section_results(r)
        md += section_sft(r)
        md += section_rl(r)
        md += section_case_study(r)
        md += section_claims(r)  # after the case study: it uses the entropy measured there
        md += section_tracking(r, ident)
        md += section_stages(r)

        atomic_write_text(out / "report.json", json.dumps(r.everything, indent=1, default=str))
        atomic_write_text(out / "report.md", "\n".join(md))
        r.outputs["report_json"] = str(out / "report.json")
        r.outputs["report_md"] = str(out / "report.md")
        if ident is not None:
            log_report(ident, r)
        return StageResult(outputs=r.outputs, summary={"report": str(out / "report.md"), "n_models": len(data.evals),
                                                       "n_sft_methods": len(data.sft_metrics)})
