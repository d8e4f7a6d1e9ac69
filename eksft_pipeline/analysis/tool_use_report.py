"""Stage `report` of `task=tool_use` (registry name `tool_report`): Tables 10-11 of the paper (App. I).

    python -m eksft_pipeline task=tool_use stage=report          # this run dir (every method's eval in it)
    python -m eksft_pipeline task=tool_use stage=report 'report.run_dirs=[runs/qwen3-4b-tool_use,runs/qwen3-8b-tool_use]'

Reads every complete `eval/<init>` entry of the listed run directories whose metrics come from the tool-use eval
(`metrics.json` with a `bfcl` block) and writes to `<run_dir>/report/`:

    table10.{md,csv}   BFCL live: overall (correct / all live AST entries) and per category, one row per model
                       size and method, the base model first; every cell "score [95% CI]"
    table11.{md,csv}   Irrelevance detection: irrelevance, live_irrelevance and their unweighted mean
    rates.{md,csv}     parse-failure and no-call rates (strict parse of every completion) and the share of
                       completions cut at the length limit, per model
    moved.{md,csv}     what SFT moved: each method's SFT model minus the base model on the same entries, with a
                       paired bootstrap CI (live overall and irrelevance mean)
    report.md, report.json

The base model is evaluated once per method's eval entry (same weights, same greedy decoding): the first one
found is shown. The paper gives no numbers for Tables 10-11, only an ordering (README); the report shows what the
run measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from eksft_pipeline.analysis.stage import ReportStage
from eksft_pipeline.contract.artifacts import atomic_write_json
from eksft_pipeline.contract.manifest import resolve_recorded
from eksft_pipeline.contract.stage_api import StageContext, StageResult
from eksft_pipeline.data.tool_use.format import IRRELEVANCE, LIVE_AST
from eksft_pipeline.scoring.bootstrap import bootstrap_ci

SHORT = {"live_simple": "Simple", "live_multiple": "Multiple", "live_parallel": "Parallel",
         "live_parallel_multiple": "Parallel multiple", "irrelevance": "Irrelevance",
         "live_irrelevance": "Live irrelevance"}  # fmt: skip


def _cell(block: dict | None) -> str:
    if not block:
        return "-"
    return f"{block['score']:.1f} [{block['ci_low']:.1f}, {block['ci_high']:.1f}]"


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join("-" if pd.isna(v) else str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def gather_tool_evals(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One record per evaluated model: model_name, method ('base' for the base model), metrics, samples path."""
    found, seen_base = [], set()
    for rd in run_dirs:
        m = rd / "manifest.json"
        if not m.exists():
            continue
        stages = json.loads(m.read_text()).get("stages", {})
        for key in sorted(stages):
            e = stages[key]
            if not key.startswith("eval/") or e.get("status") != "complete":
                continue
            outs = e.get("outputs") or {}
            for target in ("base", "sft"):
                if f"{target}_metrics" not in outs:
                    continue
                path = Path(resolve_recorded(rd, outs[f"{target}_metrics"]["path"]))
                met = json.loads(path.read_text()) if path.is_file() else {}
                if "bfcl" not in met:
                    continue
                method = "base" if target == "base" else str(met.get("init") or met.get("method"))
                if target == "base":
                    if met["model_name"] in seen_base:
                        continue
                    seen_base.add(met["model_name"])
                found.append({"model_name": met["model_name"], "method": method, "metrics": met,
                              "samples": str(path.parent / "samples.parquet"), "run_dir": str(rd)})  # fmt: skip
    found.sort(key=lambda r: (r["model_name"], r["method"] != "base", r["method"]))
    return found


def tables(evals: list[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    t10, t11, rates = [], [], []
    for r in evals:
        b = r["metrics"]["bfcl"]
        head = {"Model": r["model_name"], "Method": r["method"]}
        t10.append(head | {"BFCL live": _cell(b.get("live_overall"))}
                   | {SHORT[c]: _cell(b["categories"].get(c)) for c in LIVE_AST})
        t11.append(head | {SHORT[c]: _cell(b["categories"].get(c)) for c in IRRELEVANCE}
                   | {"Mean": _cell(b.get("irrelevance_mean"))})
        rates.append(head | {"n": b["rates"]["n"], "parse failure %": b["rates"]["parse_failure"],
                             "no call %": b["rates"]["no_call"],
                             "cut at length %": r["metrics"].get("finish_length_rate")})  # fmt: skip
    return {"table10": pd.DataFrame(t10), "table11": pd.DataFrame(t11), "rates": pd.DataFrame(rates)}


def paired_moves(evals: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """SFT minus base per method on the same entries (points, paired bootstrap over entries)."""
    rows = []
    base = {r["model_name"]: pd.read_parquet(r["samples"]) for r in evals if r["method"] == "base"}
    for r in evals:
        if r["method"] == "base" or r["model_name"] not in base:
            continue
        b = base[r["model_name"]].set_index(["benchmark", "id"]).correct.astype(float)
        s = pd.read_parquet(r["samples"]).set_index(["benchmark", "id"]).correct.astype(float)
        both = b.index.intersection(s.index)
        out = {"Model": r["model_name"], "Method": r["method"]}
        for label, cats in (("BFCL live", LIVE_AST), ("Irrelevance mean", IRRELEVANCE)):
            idx = [i for i in both if i[0] in cats]
            if not idx:
                out[label] = "-"
                continue
            d = (s.loc[idx] - b.loc[idx])
            if label == "Irrelevance mean":  # unweighted mean of the categories: weight each entry 1 / (#cats * n_cat)
                n_cat = d.groupby(level=0).transform("size")
                d = d / n_cat * len(n_cat) / d.index.get_level_values(0).nunique()
            est, lo, hi = bootstrap_ci(d.to_numpy(), n_boot=n_boot, seed=seed)
            out[label] = f"{100 * est:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            out[f"{label} ci_low"], out[f"{label} ci_high"] = round(100 * lo, 2), round(100 * hi, 2)
        rows.append(out)
    return pd.DataFrame(rows)


class ToolReportStage(ReportStage):
    name = "report"
    tracked = False

    def run(self, ctx: StageContext) -> StageResult:
        out = ctx.out_dir
        out.mkdir(parents=True, exist_ok=True)
        evals = gather_tool_evals(self._run_dirs(ctx))
        if not evals:
            raise ValueError("report: no tool-use eval results (eval/<method> with BFCL metrics) in "
                             f"{[str(d) for d in self._run_dirs(ctx)]}; run the eval stage with task=tool_use first")
        tabs = tables(evals)
        tabs["moved"] = paired_moves(evals, n_boot=int(ctx.cfg.task.eval.bootstrap), seed=int(ctx.cfg.seed))
        files = {}
        for name, df in tabs.items():
            shown = df[[c for c in df.columns if not c.endswith(("ci_low", "ci_high"))]] if len(df) else df
            (out / f"{name}.md").write_text(_markdown(shown) if len(df) else "(none)\n")
            df.to_csv(out / f"{name}.csv", index=False)
            files[name] = str(out / f"{name}.csv")
        md = ["# Tool use (paper App. I): BFCL live and irrelevance detection", "",
              "Scored offline with BFCL's own AST checker (bfcl-eval); one greedy completion per entry; "
              "95% bootstrap CIs over entries.", "",
              "## Table 10: BFCL live (correct / all live AST entries, and per category)", "",
              (out / "table10.md").read_text(), "## Table 11: Irrelevance detection", "",
              (out / "table11.md").read_text(), "## Parse failures and no-call rates", "", (out / "rates.md").read_text(),
              "## What SFT moved (SFT minus base, same entries, paired bootstrap CI, points)", "",
              (out / "moved.md").read_text(),
              "The paper reports an ordering, not numbers: EKSFT has the best BFCL live score and saturates "
              "irrelevance at 100.0; DFT improves irrelevance but loses 13.9% on BFCL live for Qwen3-4B."]  # fmt: skip
        (out / "report.md").write_text("\n".join(md) + "\n")
        atomic_write_json(out / "report.json", {"evals": [{k: v for k, v in r.items()} for r in evals],
                                                "moved": tabs["moved"].to_dict("records")}, indent=2)  # fmt: skip
        return StageResult(outputs={"report_md": str(out / "report.md"), "report_json": str(out / "report.json"),
                                    **files},
                           summary={"n_models": len(evals), "moved": tabs["moved"].to_dict("records")})
