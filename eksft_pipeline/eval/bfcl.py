"""BFCL scoring offline with BFCL's own AST checker (the paper's tool-use evaluation, App. I, Tables 10-11).

Data and checker come from the ``bfcl-eval`` package (PyPI 2026.3.23, Apache-2.0), which ships BFCL v4's
questions (``bfcl_eval/data/BFCL_v4_<category>.json``) and possible answers (``.../possible_answer/``). Its pinned
dependencies (numpy 1.26, openai, anthropic, ...) conflict with ours, so it is installed ``--no-deps``
(``make install``; pin in ``scripts/constraints-cpu.txt``): the checker itself (``eval_checker/ast_eval``,
``bfcl_eval.utils``) needs only ``filelock`` (already in our set). One module of its import chain is not loaded:
``bfcl_eval.constants.model_config``, BFCL's registry of API/hosted model handlers, which imports every vendor
SDK. The AST checker reads one flag of it, ``underscore_to_dot`` (in ``convert_func_name``), which is ``False``
for local models that see function names as written (BFCL's own ``Qwen/Qwen3-8B-FC`` entry): :func:`checker`
puts a stand-in module with that flag ``False`` for every model name into ``sys.modules`` before importing the
checker, and only if the real module is not already loaded. Everything else is BFCL's code, unchanged.

Prompts (:func:`prompt_messages`): the entry's first (and, for these categories, only) turn; its tool docs
rendered into the system turn by :func:`eksft_pipeline.data.tool_use.format.tools_system_prompt`, the same text
as the SFT data, which is what BFCL's ``QwenFCHandler`` sends Qwen3 (a system message of the entry goes before
the docs, as there).

Decoding (:func:`bfcl_decode`) is ``QwenFCHandler.decode_ast`` on the completion with its thinking stripped
(``QwenFCHandler._parse_query_response_prompting``): ``<tool_call>`` blocks that are not JSON are skipped, a
block without ``name`` / ``arguments`` is a decode error. The strict parse of
:func:`~eksft_pipeline.data.tool_use.format.parse_tool_calls` only feeds the parse-failure and no-call rates.

Scoring (:func:`score_entry`, :func:`summarize`), as BFCL's ``eval_runner``:

* live AST categories (``live_simple``, ``live_multiple``, ``live_parallel``, ``live_parallel_multiple``):
  decode, check the decoded layout (``is_function_calling_format_output``), then ``ast_checker``; BFCL live
  overall = correct / all live AST entries (1,351), and per category.
* irrelevance (``irrelevance``, 240; ``live_irrelevance``, 884): correct when the output holds no function call
  (decode fails or ``is_empty_output``); reported separately and as their unweighted mean.
* every number has a percentile bootstrap CI over entries (``eval.metrics.bootstrap_ci``); the irrelevance mean
  and the live overall resample within each category (stratified), so each replicate keeps the category sizes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from eksft_pipeline.data.schema import DataError
from eksft_pipeline.data.tool_use.format import (
    IRRELEVANCE,
    LIVE_AST,
    parse_tool_calls,
    strip_thinking,
    tools_system_prompt,
)
from eksft_pipeline.eval.metrics import bootstrap_ci

BFCL_VERSION = "2026.3.23"  # the bfcl-eval release whose data and checker this module was written against
CATEGORIES = LIVE_AST + IRRELEVANCE
INSTALL_HINT = f"pip install --no-deps bfcl-eval=={BFCL_VERSION} (make install does it)"
_CALL_RE = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)  # QwenFCHandler._extract_tool_calls


def data_dir(path: str | Path | None = None) -> Path:
    """BFCL's data folder: ``path`` if given, else the installed ``bfcl_eval`` package's ``data/``."""
    if path not in (None, ""):
        d = Path(str(path)).expanduser()
        if not (d / "possible_answer").is_dir():
            raise DataError(f"BFCL data folder {d} has no possible_answer/ (pass bfcl_eval's data/ folder)")
        return d
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"bfcl-eval is not installed: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"BFCL file missing: {path}")
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def load_category(category: str, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Entries of one category, each with its ``possible_answer`` (``None`` for irrelevance), in file order."""
    if category not in CATEGORIES:
        raise DataError(f"unknown BFCL category {category!r} (expected one of {list(CATEGORIES)})")
    d = data_dir(path)
    entries = _read(d / f"BFCL_v4_{category}.json")
    if category in LIVE_AST:
        answers = {a["id"]: a["ground_truth"] for a in _read(d / "possible_answer" / f"BFCL_v4_{category}.json")}
        missing = [e["id"] for e in entries if e["id"] not in answers]
        if missing:
            raise DataError(f"BFCL {category}: {len(missing)} entries without a possible answer, e.g. {missing[0]}")
        for e in entries:
            e["possible_answer"] = answers[e["id"]]
    else:
        for e in entries:
            e["possible_answer"] = None
    return entries


def prompt_messages(entry: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages for one entry: tool docs in the system turn (module docstring), then the entry's turn."""
    turn = [dict(role=m["role"], content=m["content"]) for m in entry["question"][0]]
    system = ""
    if turn and turn[0]["role"] == "system":
        system = turn.pop(0)["content"]
    return [{"role": "system", "content": tools_system_prompt(entry["function"], system)}, *turn]


# ------------------------------------------------------------------------------------------- the checker


class _LocalModels(dict):
    """Stand-in for BFCL's MODEL_CONFIG_MAPPING: every model is local, function names used as written."""

    def __missing__(self, key: str) -> Any:
        return types.SimpleNamespace(model_name=key, underscore_to_dot=False)


def checker() -> types.SimpleNamespace:
    """BFCL's ``ast_checker``, ``Language``, ``is_function_calling_format_output``, ``is_empty_output``."""
    if importlib.util.find_spec("bfcl_eval") is None:
        raise DataError(f"bfcl-eval is not installed: {INSTALL_HINT}")
    name = "bfcl_eval.constants.model_config"
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.MODEL_CONFIG_MAPPING = _LocalModels()
        stub.__doc__ = "eksft_pipeline stand-in (eval/bfcl.py): BFCL's model registry without the vendor SDKs"
        sys.modules[name] = stub
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl_eval.utils import is_empty_output, is_function_calling_format_output

    return types.SimpleNamespace(ast_checker=ast_checker, Language=Language, is_empty_output=is_empty_output,
                                 is_format_ok=is_function_calling_format_output)  # fmt: skip


def bfcl_decode(completion: str) -> list[dict[str, Any]]:
    """``QwenFCHandler.decode_ast`` of the completion, thinking stripped first; raises ValueError/KeyError as it."""
    calls = []
    for block in _CALL_RE.findall(strip_thinking(completion)):
        try:
            calls.append(json.loads(block))
        except json.JSONDecodeError:
            pass
    if any(type(c) is not dict for c in calls):
        raise ValueError(f"Model did not return a list of function calls: {completion[:200]}")
    return [{c["name"]: dict(c["arguments"].items())} for c in calls]


def score_entry(category: str, entry: dict[str, Any], completion: str, model_name: str = "local-model") -> dict:
    """``{"id", "category", "correct", "status", "error_type"}`` for one completion (module docstring).

    ``status`` is the strict parse (``ok`` / ``no_call`` / ``parse_failure``) for the report's rates.
    """
    ck = checker()
    _, status = parse_tool_calls(completion)
    out = {"id": entry["id"], "category": category, "status": status, "error_type": None}
    try:
        decoded = bfcl_decode(completion)
        decode_error = None
    except Exception as e:  # noqa: BLE001 - BFCL counts any decode exception as a decode failure
        decoded, decode_error = None, f"{type(e).__name__}: {e}"
    if category in IRRELEVANCE:
        has_call = decoded is not None and not ck.is_empty_output(decoded)
        out["correct"] = not has_call
        out["error_type"] = "irrelevance_error:decoder_success" if has_call else None
        return out
    if decoded is None:
        out.update(correct=False, error_type="ast_decoder:decoder_failed", error=decode_error)
        return out
    if not ck.is_format_ok(decoded):
        out.update(correct=False, error_type="ast_decoder:decoder_wrong_output_format")
        return out
    res = ck.ast_checker(entry["function"], decoded, entry["possible_answer"], ck.Language.PYTHON, category,
                         model_name)  # fmt: skip
    out.update(correct=bool(res["valid"]), error_type=None if res["valid"] else res.get("error_type"))
    return out


# ---------------------------------------------------------------------------------------------- summary


def _stratified_ci(groups: list[np.ndarray], combine, n_boot: int, seed: int, alpha: float = 0.05):
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        reps[b] = combine([g[rng.integers(0, len(g), len(g))] for g in groups])
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(combine(groups)), float(low), float(high)


def _pooled(groups):
    return float(np.concatenate(groups).mean())


def _mean_of_means(groups):
    return float(np.mean([g.mean() for g in groups]))


def summarize(results: list[dict[str, Any]], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Scores (percent) with 95% bootstrap CIs from :func:`score_entry` results; categories absent are left out.

    ``live_overall`` = correct / all live AST entries present; ``irrelevance_mean`` = unweighted mean of
    ``irrelevance`` and ``live_irrelevance``; ``rates``: parse-failure and no-call rates over every entry.
    """
    by_cat: dict[str, np.ndarray] = {}
    for c in CATEGORIES:
        v = [float(r["correct"]) for r in results if r["category"] == c]
        if v:
            by_cat[c] = np.asarray(v)
    unknown = {r["category"] for r in results} - set(CATEGORIES)
    if unknown:
        raise DataError(f"summarize: unknown BFCL categories {sorted(unknown)}")

    def pct(t):
        return {"score": round(100 * t[0], 2), "ci_low": round(100 * t[1], 2), "ci_high": round(100 * t[2], 2)}

    out: dict[str, Any] = {"categories": {}}
    for c, v in by_cat.items():
        out["categories"][c] = {"n": int(len(v)), "correct": int(v.sum()),
                                **pct(bootstrap_ci(v, n_boot=n_boot, seed=seed))}  # fmt: skip
    live = [by_cat[c] for c in LIVE_AST if c in by_cat]
    if live:
        out["live_overall"] = {"n": int(sum(len(g) for g in live)), "correct": int(sum(g.sum() for g in live)),
                               "categories": [c for c in LIVE_AST if c in by_cat],
                               **pct(_stratified_ci(live, _pooled, n_boot, seed))}  # fmt: skip
    irr = [by_cat[c] for c in IRRELEVANCE if c in by_cat]
    if irr:
        out["irrelevance_mean"] = {"categories": [c for c in IRRELEVANCE if c in by_cat],
                                   **pct(_stratified_ci(irr, _mean_of_means, n_boot, seed))}  # fmt: skip
    n = len(results)
    statuses = [r["status"] for r in results]
    out["rates"] = {"n": n, "parse_failure": round(100 * statuses.count("parse_failure") / n, 2) if n else None,
                    "no_call": round(100 * statuses.count("no_call") / n, 2) if n else None}  # fmt: skip
    return out


__all__ = [
    "BFCL_VERSION",
    "CATEGORIES",
    "IRRELEVANCE",
    "LIVE_AST",
    "bfcl_decode",
    "checker",
    "data_dir",
    "load_category",
    "prompt_messages",
    "score_entry",
    "summarize",
]
