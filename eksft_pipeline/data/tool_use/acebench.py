"""ACEBench -> SFT rows with tools (the paper's tool-use training set, App. I), deterministic split and report.

Input: an ACEBench ``data_all`` folder (github.com/chenchen0103/ACEBench, MIT), passed as a path: the folder
holding ``data_en/`` / ``data_zh/`` (or one language folder itself). Each category's questions are in
``data_<category>.json`` (JSON lines: ``id``, ``question``, ``function``, optional ``time`` / ``profile``), its
gold in ``possible_answer/data_<category>.json`` joined by ``id``.

Conversion of one row (:func:`convert_row`):

* ``question`` is a string of turns ``"user: ...\\nsystem: ...\\n"``; a line starting ``user:`` or ``system:``
  opens a turn, other lines continue the previous one. ``user`` turns stay user messages. A ``system`` turn is
  the assistant speaking (ACEBench's name for it): a ``system`` turn that is a Python call list
  ``[f(a=1), g(b="x")]`` (an earlier call in a multi-turn history) becomes an assistant message with those
  calls in the run's ``<tool_call>`` format (:mod:`.format`), and a ``system`` turn right after such a call is
  that call's result, rendered as Qwen3 renders a ``tool`` message (a user turn ``<tool_response>\\n...\\n
  </tool_response>``); any other ``system`` turn is an assistant text message. verl's ``MultiTurnSFTDataset``
  puts every assistant message in the loss, so earlier assistant turns are trained on too.
* The tool schemas (``function``) go into the system message (:func:`.format.tools_system_prompt`) after a
  short context line holding ACEBench's ``time`` and, for ``normal_preference``, the user ``profile`` (ACEBench
  gives both to the model in its own prompt; their wording here is ours).
* The target (the last assistant message) by category, defined in :data:`SPECIAL_TARGETS` and :func:`target_for`:
  normal rows -> the gold calls (``{name: args}``; parallel calls carry ``_1``, ``_2`` suffixes on a repeated
  name, stripped when the bare name is a tool and the suffixed one is not; a gold that is a list of
  alternatives -> the first); ``special_irrelevant`` -> no call, a short refusal; ``special_incomplete`` -> no
  call, ask for the missing parameters of the named function; ``special_error_param`` -> no call, name the wrong
  value(s) and their parameter(s). The refusal text is ACEBench's own gold string; the other two follow the
  wording of ACEBench's special-category prompt in spirit, ours verbatim (``# src: assumption``).
* ``agent_*`` rows (multi-step, scored on end states) have no single target: left out, counted as
  ``agent_no_single_target``.

Bad input raises :class:`~eksft_pipeline.data.schema.DataError` (one line): a missing folder or question file,
a missing gold file, a row whose id has no gold, a ``function`` that is not a JSON list of schema objects, an
unknown category file. Rows that are well-formed but unusable are dropped and counted by reason
(:data:`DROP_REASONS`) in ``split_report.json`` and listed in ``dropped.jsonl``; ``n_input == n_sft +
n_unused + n_dropped`` always holds (checked before writing).

Split (:func:`split_acebench`): the kept rows in (language, category file name, line) order get an index; a
``numpy.random.default_rng(seed)`` permutation picks ``n_sft`` of them (``None``: all) for
``sft_train.parquet``, written sorted by index. No timestamps are written: a rerun is byte-identical.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eksft_pipeline.contract.manifest import sha256_file
from eksft_pipeline.data.schema import DataError

from .format import ToolFormatError, render_tool_calls, tools_system_prompt

LANGS = ("en", "zh")
NORMAL = (
    "normal_single_turn_single_function", "normal_single_turn_parallel_function", "normal_multi_turn_user_adjust",
    "normal_multi_turn_user_switch", "normal_similar_api", "normal_preference", "normal_atom_bool",
    "normal_atom_enum", "normal_atom_number", "normal_atom_list", "normal_atom_object_deep",
    "normal_atom_object_short",
)  # fmt: skip
SPECIAL = ("special_incomplete", "special_error_param", "special_irrelevant")
AGENT = ("agent_multi_step", "agent_multi_turn")
CATEGORIES = NORMAL + SPECIAL + AGENT  # ACEBench's category.py, "test_all"

# Every reason a well-formed row is left out, in report order.
DROP_REASONS: tuple[str, ...] = (
    "agent_no_single_target",  # agent_* categories: multi-step, scored on end states, no single SFT target
    "last_turn_not_user",  # the question does not end with a user turn: nothing to answer
    "history_call_unparsable",  # an earlier `system: [f(...)]` call in the history is not a Python call list
    "gold_call_not_in_tools",  # a gold call names no function of the row's tools (after the _N suffix rule)
    "bad_gold",  # the gold has the wrong shape for its category (e.g. empty, args not an object)
    "duplicate_conversation",  # same tools + messages as an earlier kept row (first kept)
    "over_length",  # the chat-templated conversation has more tokens than cutoff_tokens (with a tokenizer)
)

# The special categories' targets: the ONE place they are defined. Keys of str.format: func, params, values.
SPECIAL_TARGETS: dict[str, dict[str, str]] = {
    "special_irrelevant": {  # no call; ACEBench's own gold string for this category (both languages)
        "en": "Due to the limitations of the function, I cannot solve this problem.",
        "zh": "Due to the limitations of the function, I cannot solve this problem.",
    },
    "special_incomplete": {  # no call; ask for the missing required parameters of the function to call
        "en": "Missing necessary parameters ({func}: {params}), please provide the necessary parameters.",
        "zh": "缺少必要的参数（{func}: {params}），请提供必要的参数。",
    },
    "special_error_param": {  # no call; name the wrong value(s) and the parameter(s) they were given for
        "en": "There is incorrect value ({values}) for the parameters ({params}) in the conversation history.",
        "zh": "对话历史中参数（{params}）的值（{values}）有误。",
    },
}
CONTEXT_LINES = {"time": {"en": "{}", "zh": "{}"},  # ACEBench's time field is already a sentence
                 "profile": {"en": "User profile: {}", "zh": "用户画像：{}"}}  # fmt: skip

SFT_FILE, DROPPED_FILE, REPORT_FILE, IDS_FILE = "sft_train.parquet", "dropped.jsonl", "split_report.json", "sft_ids.json"
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SFT_SCHEMA = pa.schema([
    ("id", pa.int64()), ("ace_id", pa.string()), ("data_source", pa.string()), ("lang", pa.string()),
    ("messages", pa.list_(MESSAGE)), ("tools_json", pa.string()), ("ground_truth", pa.string()),
])  # fmt: skip


class _Drop(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------------------------ reading


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(obj, dict) or "id" not in obj:
            raise DataError(f"{path}:{n}: not a JSON object with an 'id'")
        rows.append(obj)
    return rows


def lang_dir(root: str | Path, lang: str) -> Path:
    """``<root>/data_<lang>`` (or ``<root>/data_all/data_<lang>``, or ``root`` itself if it is that folder)."""
    if lang not in LANGS:
        raise DataError(f"unknown ACEBench language {lang!r} (expected one of {list(LANGS)})")
    root = Path(root).expanduser()
    for d in (root / f"data_{lang}", root / "data_all" / f"data_{lang}"):
        if d.is_dir():
            return d
    if root.name == f"data_{lang}" and root.is_dir():
        return root
    raise DataError(f"ACEBench folder not found: no data_{lang}/ under {root}")


def _category_files(d: Path) -> list[tuple[str, Path]]:
    files = sorted(d.glob("data_*.json"))
    if not files:
        raise DataError(f"no data_<category>.json files in {d}")
    out = []
    for f in files:
        cat = f.stem[len("data_"):]
        if cat not in CATEGORIES:
            raise DataError(f"{f}: unknown ACEBench category {cat!r} (known: {list(CATEGORIES)})")
        out.append((cat, f))
    return out


def _tools(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    fn = row.get("function")
    if isinstance(fn, str):
        try:
            fn = json.loads(fn)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: tool schema ('function') is not JSON ({e.msg})") from None
    if not isinstance(fn, list) or not fn or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                     for t in fn):
        raise DataError(f"{where}: tool schema ('function') is not a list of JSON-schema objects with a name")
    return fn


# ----------------------------------------------------------------------------------------------- turns

_TURN = re.compile(r"^(user|system):[ \t]?", re.MULTILINE)


def split_turns(question: str) -> list[tuple[str, str]]:
    """``[(speaker, text), ...]`` of an ACEBench question (speaker ``user`` / ``system``); text stripped."""
    marks = list(_TURN.finditer(question))
    turns = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(question)
        turns.append((m.group(1), question[m.end():end].strip()))
    return turns


class _JsonNames(ast.NodeTransformer):
    """ACEBench histories mix JSON literals into Python calls (``f(a={"x": true})``): true/false/null -> constants."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        lit = {"true": True, "false": False, "null": None}
        return ast.copy_location(ast.Constant(lit[node.id]), node) if node.id in lit else node


def parse_python_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """``[f(a=1), g(b="x")]`` -> [("f", {"a": 1}), ("g", {"b": "x"})]; None if ``text`` is not such a list.
    JSON's ``true`` / ``false`` / ``null`` are read as Python's (ACEBench writes both)."""
    t = text.strip()
    if not (t.startswith("[") and t.endswith("]")):
        return None
    try:
        node = ast.parse(t, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.List) or not node.elts:
        return None
    calls = []
    for c in node.elts:
        if not isinstance(c, ast.Call) or c.args:
            return None
        name = ast.unparse(c.func)
        try:
            args = {kw.arg: ast.literal_eval(_JsonNames().visit(kw.value)) for kw in c.keywords if kw.arg is not None}
        except (ValueError, SyntaxError):
            return None
        calls.append((name, args))
    return calls


def _looks_like_call(text: str) -> bool:
    return bool(re.fullmatch(r"\[\s*[A-Za-z_][\w.]*\(.*\)\s*\]", text.strip(), re.DOTALL))


def history_messages(question: str) -> list[dict[str, str]]:
    """The conversation of a question as chat messages (module docstring); raises ``_Drop`` for unusable ones."""
    msgs: list[dict[str, str]] = []
    after_call = False
    for speaker, text in split_turns(question):
        if speaker == "user":
            msgs.append({"role": "user", "content": text})
            after_call = False
            continue
        calls = parse_python_calls(text)
        if calls is not None:
            msgs.append({"role": "assistant", "content": render_tool_calls(calls)})
            after_call = True
        elif _looks_like_call(text):
            raise _Drop("history_call_unparsable", text[:120])
        elif after_call:
            msgs.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
            after_call = False
        else:
            msgs.append({"role": "assistant", "content": text})
    if not msgs or msgs[-1]["role"] != "user" or msgs[-1]["content"].startswith("<tool_response>"):
        raise _Drop("last_turn_not_user", f"{len(msgs)} turns, last {msgs[-1]['role'] if msgs else 'none'}")
    return msgs


# ---------------------------------------------------------------------------------------------- targets


def _gold_calls(gold: Any, tool_names: set[str]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(gold, list):  # a list of alternative answers: the first is the target
        gold = gold[0] if gold else None
    if not isinstance(gold, dict) or not gold:
        raise _Drop("bad_gold", f"gold is {type(gold).__name__}, not a non-empty {{name: args}} object")
    calls = []
    for key, args in gold.items():
        name = key
        if name not in tool_names:
            bare = re.sub(r"_\d+$", "", name)
            if bare in tool_names:
                name = bare
            else:
                raise _Drop("gold_call_not_in_tools", f"{key!r} not among {sorted(tool_names)}"[:200])
        if not isinstance(args, dict):
            raise _Drop("bad_gold", f"arguments of {key!r} are {type(args).__name__}, not an object")
        calls.append((name, args))
    return calls


def target_for(category: str, gold: Any, tool_names: set[str], lang: str) -> str:
    """The assistant's target content for a row of ``category`` (module docstring; texts in SPECIAL_TARGETS)."""
    if category in NORMAL:
        return render_tool_calls(_gold_calls(gold, tool_names))
    texts = SPECIAL_TARGETS.get(category)
    if texts is None:
        raise DataError(f"no target defined for category {category!r}")
    if category == "special_irrelevant":
        return texts[lang]
    if not isinstance(gold, dict) or not gold or not all(isinstance(v, list) and v for v in gold.values()):
        raise _Drop("bad_gold", f"{category} gold must map names to non-empty lists, got {gold!r}"[:200])
    if category == "special_incomplete":
        return " ".join(texts[lang].format(func=f, params=", ".join(map(str, ps))) for f, ps in gold.items())
    # special_error_param: {param: [wrong values]}
    return texts[lang].format(params=", ".join(gold), values=", ".join(str(v) for vs in gold.values() for v in vs))


def convert_row(row: dict[str, Any], gold: Any, category: str, lang: str, where: str) -> dict[str, Any]:
    """One ACEBench row -> ``{messages, tools_json, ground_truth}``; raises ``_Drop`` / ``DataError``."""
    tools = _tools(row, where)
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' is not a non-empty string")
    msgs = history_messages(question)
    context = []
    for key in ("time", "profile"):
        if str(row.get(key) or "").strip():
            context.append(CONTEXT_LINES[key][lang].format(str(row[key]).strip()))
    system = tools_system_prompt(tools, "\n".join(context))
    target = target_for(category, gold, {t["name"] for t in tools}, lang)
    return {
        "messages": [{"role": "system", "content": system}, *msgs, {"role": "assistant", "content": target}],
        "tools_json": json.dumps(tools, ensure_ascii=False),
        "ground_truth": json.dumps(gold, ensure_ascii=False),
    }


# ------------------------------------------------------------------------------------------------ the split


def load_acebench(root: str | Path, langs: tuple[str, ...] | list[str] = ("en",)):
    """All rows of ``langs`` converted: ``(kept, dropped, per_category)``.

    kept: list of (order, row dict); dropped: list of (order, ace_id, reason, detail); per_category:
    ``{lang/category: {"input": n, "kept": n, <reason>: n}}``.
    """
    if not langs:
        raise DataError("acebench: no language selected (langs=[])")
    kept, dropped, per_cat = [], [], {}
    seen: dict[str, str] = {}
    order = 0
    for lang in langs:
        d = lang_dir(root, lang)
        for cat, qfile in _category_files(d):
            gfile = d / "possible_answer" / qfile.name
            if not gfile.is_file():
                raise DataError(f"gold file missing for {cat}: {gfile}")
            golds = {g["id"]: g for g in _read_jsonl(gfile)}
            stats = per_cat.setdefault(f"{lang}/{cat}", Counter())
            for n, row in enumerate(_read_jsonl(qfile), 1):
                where = f"{qfile}:{n} (id {row['id']})"
                stats["input"] += 1
                if row["id"] not in golds or "ground_truth" not in golds[row["id"]]:
                    raise DataError(f"{where}: no gold answer in {gfile}")
                try:
                    if cat in AGENT:
                        raise _Drop("agent_no_single_target", "agent rows are multi-step; no single SFT target")
                    conv = convert_row(row, golds[row["id"]]["ground_truth"], cat, lang, where)
                    key = json.dumps([conv["tools_json"], conv["messages"]], ensure_ascii=False)
                    if key in seen:
                        raise _Drop("duplicate_conversation", f"same as {seen[key]}")
                    seen[key] = row["id"]
                except _Drop as e:
                    dropped.append((order, f"{lang}/{row['id']}", e.reason, e.detail))
                    stats[e.reason] += 1
                else:
                    kept.append((order, {"ace_id": str(row["id"]), "data_source": f"acebench/{cat}", "lang": lang,
                                         **conv}))
                    stats["kept"] += 1
                order += 1
    return kept, dropped, {k: dict(v) for k, v in per_cat.items()}


def _length_filter(kept: list, dropped: list, per_cat: dict, tokenizer: Any, cutoff_tokens: int) -> tuple[list, dict]:
    """Rows whose whole conversation, rendered with the tokenizer's (the run's) chat template, fits cutoff_tokens."""
    out, lengths = [], []
    for i, r in kept:
        text = tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=False)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > cutoff_tokens:
            dropped.append((i, f"{r['lang']}/{r['ace_id']}", "over_length", f"{n} tokens > {cutoff_tokens}"))
            stats = per_cat[f"{r['lang']}/{r['data_source'].split('/', 1)[1]}"]
            stats["kept"] -= 1
            stats["over_length"] = stats.get("over_length", 0) + 1
        else:
            out.append((i, r))
            lengths.append(n)
    a = np.asarray(lengths or [0])
    stats = {"min": int(a.min()), "mean": round(float(a.mean()), 2), "p95": round(float(np.percentile(a, 95)), 2),
             "max": int(a.max())}  # fmt: skip
    return out, {"applied": f"cutoff_tokens={cutoff_tokens} with tokenizer {getattr(tokenizer, 'name_or_path', '?')}",
                 "tokens": stats}


def split_acebench(root: str | Path, out_dir: str | Path, *, langs: tuple[str, ...] | list[str] = ("en",),
                   n_sft: int | None = None, seed: int = 42, tokenizer: Any = None,
                   cutoff_tokens: int | None = None) -> dict[str, Any]:
    """Convert ACEBench and write ``sft_train.parquet``, ``sft_ids.json``, ``dropped.jsonl`` and
    ``split_report.json`` to ``out_dir``; returns the report (module docstring). With a ``tokenizer`` (the run's:
    its chat template renders the rows as SFT will) rows longer than ``cutoff_tokens`` are dropped as
    ``over_length`` (verl's SFT dataset would refuse them: ``truncation: error``)."""
    kept, dropped, per_cat = load_acebench(root, tuple(langs))
    length_check: dict[str, Any] = {"applied": "skipped: no tokenizer given"}
    if tokenizer is not None:
        if not cutoff_tokens or cutoff_tokens < 1:
            raise DataError(f"cutoff_tokens={cutoff_tokens} must be >= 1 with a tokenizer")
        kept, length_check = _length_filter(kept, dropped, per_cat, tokenizer, int(cutoff_tokens))
        dropped.sort()
    n_input = len(kept) + len(dropped)
    if n_sft is not None and not 1 <= n_sft <= len(kept):
        raise DataError(f"n_sft={n_sft} but ACEBench {list(langs)} has {len(kept)} usable rows")
    if not kept:
        raise DataError(f"no usable ACEBench rows in {root} for {list(langs)}")
    perm = np.random.default_rng(seed).permutation(len(kept))
    chosen = sorted(perm[: n_sft if n_sft is not None else len(kept)].tolist())
    sft = [kept[p] for p in chosen]
    n_unused = len(kept) - len(sft)
    if len(sft) + n_unused + len(dropped) != n_input:  # every input row is accounted for
        raise AssertionError("acebench split lost rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{"id": i, **r} for i, r in sft], schema=SFT_SCHEMA)
    pq.write_table(table, out / SFT_FILE)
    (out / IDS_FILE).write_text(json.dumps([i for i, _ in sft]) + "\n")
    with (out / DROPPED_FILE).open("w", encoding="utf-8") as f:
        for i, ace_id, reason, detail in dropped:
            f.write(json.dumps({"index": i, "ace_id": ace_id, "reason": reason, "detail": detail},
                               ensure_ascii=False) + "\n")
    counts = Counter(reason for *_, reason, _ in dropped)
    files = {"sft": SFT_FILE, "sft_ids": IDS_FILE, "dropped": DROPPED_FILE}
    report = {
        "task": "tool_use",
        "source": str(root),
        "langs": list(langs),
        "n_input": n_input,
        "n_valid": len(kept),
        "n_sft": len(sft),
        "n_rl": 0,
        "n_unused": n_unused,
        "dropped": {r: counts.get(r, 0) for r in DROP_REASONS},
        "n_dropped": len(dropped),
        "per_category": per_cat,
        "length_check": length_check,
        "n_sft_per_category": dict(sorted(Counter(r["data_source"] for _, r in sft).items())),
        "seed": seed,
        "generation_prefix": "",
        "special_targets": SPECIAL_TARGETS,
        "files": files,
        "sha256": {k: sha256_file(out / v) for k, v in files.items()},
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


__all__ = [
    "CATEGORIES",
    "DROP_REASONS",
    "SPECIAL_TARGETS",
    "ToolFormatError",
    "convert_row",
    "history_messages",
    "load_acebench",
    "parse_python_calls",
    "split_acebench",
    "split_turns",
    "target_for",
]
