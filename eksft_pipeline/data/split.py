"""Split stage: OpenR1-schema rows -> a disjoint SFT subset (verl multi-turn parquet) and RL subset (verl RL parquet).

Procedure (``split_dataset``), deterministic for a given input and seed:

1. Load ``source``: an HF hub name (``Elliott/Openr1-Math-46k-8192``, via ``datasets.load_dataset``) or a local
   ``.parquet`` / ``.jsonl`` / ``.json`` file or a directory of them (files read in sorted name order and
   concatenated). The *original index* of a row is its 0-based position in that concatenation.
   Columns are checked up front (one-line :class:`DataError` naming the column): required columns present,
   no unknown columns unless ``allow_extra_columns=True``, every column named in ``field_map`` present.
   A pandas index column (``__index_level_0__``, written by ``DataFrame.to_parquet`` for a filtered frame)
   holds row labels, not data: it is dropped on read.
2. Validate each row (:func:`eksft_pipeline.data.schema.validate_row`); apply the ``think_prefix`` mode; if a
   tokenizer is given, drop rows whose chat-templated length (system+user+assistant, as the SFT sequence is
   rendered) exceeds ``cutoff_tokens``; then drop later copies of an already-kept normalised user prompt.
   Every dropped row is counted per reason and written to ``dropped.jsonl`` (index, reason, detail).
3. Permute the valid rows with ``numpy.random.default_rng(seed).permutation``; the first ``n_sft`` go to SFT,
   the next ``n_rl`` (default: all the rest) to RL. Each split is written sorted by original index.
4. :func:`check_disjoint` raises :class:`SplitOverlapError` if any original index or normalised prompt is in
   both splits (a safety net: step 2's de-duplication makes it hold unless ``dedupe_prompts=False``).

``think_prefix`` (the R1 trace starts with ``"<think>\\n"``):

* ``keep``   - the assistant content keeps ``<think>\\n``; generation prompt is the plain template one
  (``generation_prefix=""``). The SFT loss covers ``<think>\\n``.
* ``prompt`` - ``<think>\\n`` is removed from the assistant content and becomes ``generation_prefix``: RL and
  eval must append it to the rendered generation prompt, and SFT must render it between
  ``<|im_start|>assistant\\n`` and the content *outside* the loss (the tiny tokenizer's chat template does
  both when given ``apply_chat_template_kwargs={"generation_prefix": "<think>\\n"}``, see
  :mod:`eksft_pipeline.models.tokenizer`). Rows whose trace lacks the prefix are dropped (``missing_think_prefix``).
* ``strip``  - a leading ``<think>\\n`` (or ``<think>``) is removed and not re-added anywhere
  (``generation_prefix=""``); ``</think>`` stays in the content.

Outputs in ``out_dir``: ``sft_train.parquet``, ``rl_train.parquet`` (layouts in :mod:`.schema`),
``sft_ids.json`` / ``rl_ids.json`` (sorted original indices), ``dropped.jsonl``, ``split_report.json``
(counts, dropped per reason, token-length stats per split, seed, think_prefix mode, generation_prefix,
sha256 of every other output file). No timestamps are written, so a rerun is byte-identical.

Launch (through the orchestrator): ``python -m eksft_pipeline stage=split``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from eksft_pipeline.contract.manifest import sha256_file
from eksft_pipeline.contract.run_format import THINK_PREFIX, THINK_PREFIX_MODES, generation_prefix_for

from .schema import (
    DROP_REASONS,
    KNOWN_COLUMNS,
    REQUIRED_COLUMNS,
    RL_SCHEMA,
    SFT_SCHEMA,
    THINK_OPEN,
    DataError,
    SplitOverlapError,
    normalize_prompt_text,
    user_text,
    validate_row,
)

LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json")
SFT_FILE, RL_FILE = "sft_train.parquet", "rl_train.parquet"
SFT_IDS_FILE, RL_IDS_FILE = "sft_ids.json", "rl_ids.json"
DROPPED_FILE, REPORT_FILE = "dropped.jsonl", "split_report.json"
# the paper's SFT length cutoff (prompt + response tokens): the authors' examples/example_eksft/eksft.sh:L48,
# --cutoff_len 20000. A run with another `cutoff_tokens` departs from it; `cutoff_report` measures by how much.
PAPER_CUTOFF_TOKENS = 20000

_INVALID_JSON = object()  # placeholder row for an unparsable jsonl line (counted as invalid_json)


@dataclass
class LoadedSource:
    """Rows of a source after column checks and field mapping (``rows[i]`` is original index ``i``)."""

    rows: list[Any]
    columns: list[str]
    extra_columns: list[str]
    files: list[str]


@dataclass
class SplitReport:
    """What :func:`split_dataset` did; ``to_dict()`` is exactly what ``split_report.json`` holds."""

    source: str
    input_files: list[str]
    n_input: int
    n_valid: int
    n_sft: int
    n_rl: int
    n_unused: int
    dropped: dict[str, int]
    n_dropped: int
    seed: int
    think_prefix: str
    generation_prefix: str
    length_check: str
    cutoff_tokens: int
    # the cutoff measured on this data's length distribution (cutoff_report); None without a tokenizer
    cutoff: dict[str, Any] | None
    token_stats: dict[str, Any]
    extra_columns_ignored: list[str]
    field_map: dict[str, str]
    files: dict[str, str]
    sha256: dict[str, str]
    sft_ids: list[int] = field(repr=False)
    rl_ids: list[int] = field(repr=False)
    out_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # ids live in their own files; the out_dir is where the report sits
        for k in ("sft_ids", "rl_ids", "out_dir"):
            d.pop(k)
        return d


# ----------------------------------------------------------------------------------------------- loading


def _is_hub_name(source: str) -> bool:
    """``owner/name`` with no file suffix, no path-like start and no existing local first component
    (``data/typo`` is a missing local path, not a hub name) is taken as an HF hub dataset name."""
    if source.startswith(("/", ".", "~")) or source.endswith(LOCAL_SUFFIXES):
        return False
    if Path(source.split("/", 1)[0]).exists():
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", source) is not None


def _read_jsonl(path: Path) -> list[Any]:
    rows: list[Any] = []
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = _INVALID_JSON
            rows.append(obj if isinstance(obj, dict) else _INVALID_JSON)
    return rows


# The column pandas writes for an unnamed, non-default index (``df.to_parquet()`` after filtering rows): the
# old row labels, not data. Dropped on read so a pandas-written file needs no ``allow_extra_columns``.
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")


def _read_file(path: Path) -> list[Any]:
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        index_cols = [c for c in table.column_names if _PANDAS_INDEX.fullmatch(c)]
        return (table.drop_columns(index_cols) if index_cols else table).to_pylist()
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        return [r if isinstance(r, dict) else _INVALID_JSON for r in data]
    return _read_jsonl(path)  # a .json file holding JSON lines


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"no .parquet/.jsonl/.json files in directory {path}")
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"unsupported file type {path} (expected .parquet, .jsonl or .json)")
    return [path]


def load_source(
    source: str | Path,
    *,
    hub_split: str = "train",
    field_map: dict[str, str] | None = None,
    allow_extra_columns: bool = False,
) -> LoadedSource:
    """Read all rows of ``source`` and check its columns.

    Args:
        source: HF hub dataset name (``owner/name``) or a local file / directory (see module docstring).
        hub_split: split name for ``datasets.load_dataset`` (hub sources only).
        field_map: canonical column -> column name in the source (e.g. ``{"target": "response"}``).
        allow_extra_columns: ignore columns outside the schema instead of raising.

    Raises:
        DataError: missing path, unknown ``field_map`` key, mapped column absent, required column absent,
            unknown column (unless allowed). One line, naming the thing.
    """
    field_map = dict(field_map or {})
    for key in field_map:
        if key not in KNOWN_COLUMNS:
            raise DataError(f"field_map key {key!r} is not a schema column (expected one of {list(KNOWN_COLUMNS)})")
    src = str(source)
    path = Path(src).expanduser()
    if path.exists():
        files = _local_files(path)
        rows: list[Any] = []
        for f in files:
            rows.extend(_read_file(f))
        columns_seen: dict[str, None] = {}
        for r in rows:
            if isinstance(r, dict):
                columns_seen.update(dict.fromkeys(r))
        columns = list(columns_seen)
        file_names = [str(f) for f in files]
    elif _is_hub_name(src):
        import datasets  # heavy import; only for hub sources

        try:
            from eksft_pipeline.models.hub import split_revision

            name, revision = split_revision(src)  # owner/name@revision: a pinned commit, tag or branch
            ds = datasets.load_dataset(name, split=hub_split, revision=revision)
        except Exception as e:  # noqa: BLE001 - offline / missing / auth errors come in many types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DataError(
                f"hub dataset {src!r} could not be loaded ({type(e).__name__}: {first}); download it first "
                f"(huggingface-cli download --repo-type dataset {src}) or set split.source=/path/to/file.parquet"
            ) from None
        index_cols = [c for c in ds.column_names if _PANDAS_INDEX.fullmatch(c)]
        if index_cols:
            ds = ds.remove_columns(index_cols)
        columns = list(ds.column_names)
        rows = ds.to_list()
        from eksft_pipeline.models.hub import cached_revision

        commit = cached_revision(name, revision, repo_type="dataset")  # the commit the cache holds for it, if known
        file_names = [f"hf://{name}@{commit or revision or 'unresolved'}[{hub_split}]"]
    else:
        raise DataError(f"input not found: {src}")

    for canonical, col in field_map.items():
        if col not in columns:
            raise DataError(f"field_map[{canonical!r}] names column {col!r}, which is not in {src}")
    rename = {col: canonical for canonical, col in field_map.items()}
    if rename:
        rows = [r if r is _INVALID_JSON else {rename.get(k, k): v for k, v in r.items()} for r in rows]
        columns = [rename.get(c, c) for c in columns]
    for col in REQUIRED_COLUMNS:
        if col not in columns:
            raise DataError(f"missing required column {col!r} in {src} (columns: {columns})")
    extra = [c for c in columns if c not in KNOWN_COLUMNS]
    if extra and not allow_extra_columns:
        raise DataError(
            f"unknown column {extra[0]!r} in {src} (all unknown: {extra}); "
            "map it with field_map or pass allow_extra_columns=True to ignore it"
        )
    return LoadedSource(rows=rows, columns=columns, extra_columns=extra, files=file_names)


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def drop_detail(row: dict[str, Any] | None, reason: str) -> str:
    """One human-readable line saying what exactly is wrong with a dropped row (written to dropped.jsonl)."""
    if row is None or reason == "invalid_json":
        return "the line does not parse as a JSON object"
    if reason == "missing_field":
        return f"missing column(s) {[c for c in REQUIRED_COLUMNS if c not in row]}"
    if reason == "bad_data_source":
        return f"data_source={_short(row.get('data_source'))} (need a non-empty string)"
    for col in ("prompt", "target"):
        if reason == f"{col}_not_list":
            return f"{col} is {type(row.get(col)).__name__}, not a list of messages"
        if reason == f"{col}_bad_message":
            return f"{col}={_short(row.get(col), 120)} (need [{{'role': ..., 'content': str}}], roles system/user/assistant" + (
                ", exactly one assistant message)" if col == "target" else ")")
    if reason == "prompt_no_user":
        return "the last prompt message is not a non-empty user message"
    if reason == "empty_trace":
        return "the assistant content is empty"
    if reason == "bad_reward_model":
        return f"reward_model is {type(row.get('reward_model')).__name__}, not a mapping with ground_truth"
    rm = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
    if reason == "missing_answer":
        return f"reward_model.ground_truth={_short(rm.get('ground_truth'))} (missing or empty)"
    if reason == "bad_answer_type":
        return f"reward_model.ground_truth is {type(rm.get('ground_truth')).__name__}, not a string"
    if reason == "bad_ability":
        return f"ability is {type(row.get('ability')).__name__}, not a string"
    if reason == "missing_think_prefix":
        return "think_prefix=prompt needs the trace to start with '<think>\\n'"
    return reason


# ------------------------------------------------------------------------------------------ think prefix


def apply_think_prefix(trace: str, mode: str) -> tuple[str, str]:
    """Return ``(assistant_content, generation_prefix)`` for ``mode`` in ``keep`` / ``prompt`` / ``strip``.

    ``prompt`` requires the trace to start with ``"<think>\\n"`` (validate_row enforces it).
    """
    if mode == "keep":
        return trace, ""
    if mode == "prompt":
        if not trace.startswith(THINK_PREFIX):
            raise DataError(f"think_prefix='prompt' needs a trace starting with {THINK_PREFIX!r}: {trace[:40]!r}")
        return trace[len(THINK_PREFIX) :], THINK_PREFIX
    if mode == "strip":
        for p in (THINK_PREFIX, THINK_OPEN):
            if trace.startswith(p):
                return trace[len(p) :], ""
        return trace, ""
    raise DataError(f"unknown think_prefix mode {mode!r} (expected one of {list(THINK_PREFIX_MODES)})")


# ------------------------------------------------------------------------------------------- tokenizing


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not isinstance(tokenizer, str | Path):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except OSError as e:  # transformers' messages run to many lines; the cause fits in one
        raise DataError(
            f"tokenizer {str(tokenizer)!r} could not be loaded ({type(e).__name__}); it must be a local model "
            f"directory or a hub model in the local cache (huggingface-cli download {tokenizer})"
        ) from None


def _render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool, kwargs: dict) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def token_lengths(
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    contents: list[str],
    *,
    generation_prefix: str = "",
    chat_template_kwargs: dict | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> tuple[list[int], list[int]]:
    """Token counts ``(prompt_tokens, target_tokens)`` per row, with the tokenizer's chat template.

    prompt_tokens = len(render(prompt, add_generation_prompt=True) + generation_prefix);
    target_tokens = len(render(prompt + [assistant: generation_prefix + content])) - prompt_tokens,
    i.e. the SFT sequence length minus the prompt, counting the closing ``<|im_end|>`` and separator.
    Rendering is text-only; texts are tokenized in batches (``add_special_tokens=False``, as
    ``apply_chat_template`` does).
    """
    kw = dict(chat_template_kwargs or {})
    p_len: list[int] = []
    t_len: list[int] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="token lengths", disable=not progress):
        ps = prompts[start : start + batch_size]
        cs = contents[start : start + batch_size]
        p_txt = [_render(tokenizer, p, add_generation_prompt=True, kwargs=kw) + generation_prefix for p in ps]
        f_txt = [
            _render(
                tokenizer,
                p + [{"role": "assistant", "content": generation_prefix + c}],
                add_generation_prompt=False,
                kwargs=kw,
            )
            for p, c in zip(ps, cs)
        ]
        p_ids = tokenizer(p_txt, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(f_txt, add_special_tokens=False)["input_ids"]
        for a, b in zip(p_ids, f_ids):
            p_len.append(len(a))
            t_len.append(len(b) - len(a))
    return p_len, t_len


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 2),
        "p50": round(float(np.percentile(a, 50)), 2),
        "p95": round(float(np.percentile(a, 95)), 2),
        "max": int(a.max()),
    }


# --------------------------------------------------------------------------------------------- checking


def check_disjoint(sft_ids: list[int], rl_ids: list[int], sft_prompts: list[str], rl_prompts: list[str]) -> None:
    """Raise :class:`SplitOverlapError` if an original index or a normalised prompt text is in both splits."""
    both_ids = sorted(set(sft_ids) & set(rl_ids))
    if both_ids:
        raise SplitOverlapError(
            f"SFT/RL overlap by original index: {len(both_ids)} rows in both splits, e.g. {both_ids[:5]}"
        )
    sft_keys = {normalize_prompt_text(p): i for p, i in zip(sft_prompts, sft_ids)}
    clashes = [(sft_keys[k], i) for p, i in zip(rl_prompts, rl_ids) if (k := normalize_prompt_text(p)) in sft_keys]
    if clashes:
        raise SplitOverlapError(
            f"SFT/RL overlap by normalised prompt text: {len(clashes)} RL rows repeat an SFT prompt, "
            f"e.g. (sft index, rl index) {clashes[:5]}"
        )


# ---------------------------------------------------------------------------------------------- the stage


def split_dataset(
    source: str | Path,
    out_dir: str | Path,
    *,
    n_sft: int = 3000,
    n_rl: int | None = None,
    seed: int = 42,
    tokenizer: Any = None,
    cutoff_tokens: int = PAPER_CUTOFF_TOKENS,
    think_prefix: str = "keep",
    field_map: dict[str, str] | None = None,
    allow_extra_columns: bool = False,
    dedupe_prompts: bool = True,
    hub_split: str = "train",
    chat_template_kwargs: dict | None = None,
    progress: bool = True,
) -> SplitReport:
    """Split ``source`` into disjoint SFT / RL parquet files in ``out_dir`` (see module docstring).

    Args:
        source: hub name or local file/directory in the OpenR1-Math schema.
        out_dir: output directory (created; existing outputs are overwritten).
        n_sft: rows for SFT (paper: 3000).
        n_rl: rows for RL; ``None`` = every valid row not in SFT.
        seed: permutation seed.
        tokenizer: tokenizer object or path for the ``cutoff_tokens`` length filter and token stats;
            ``None`` skips both and the report says so.
        cutoff_tokens: maximum chat-templated system+user+assistant length.
        think_prefix: ``keep`` | ``prompt`` | ``strip``.
        field_map: canonical column -> source column name.
        allow_extra_columns: ignore (and report) columns outside the schema instead of raising.
        dedupe_prompts: drop later rows whose normalised user prompt repeats a kept one (reason
            ``duplicate_prompt``). With ``False`` duplicates can land in both splits and
            :func:`check_disjoint` raises.
        hub_split: split for hub sources.
        chat_template_kwargs: extra variables for ``apply_chat_template`` when measuring lengths (not
            ``generation_prefix``: the split appends the one ``think_prefix`` implies itself).
        progress: show tqdm bars.

    Raises:
        DataError: bad source/columns/mode, or too few valid rows for ``n_sft`` (+ ``n_rl``).
        SplitOverlapError: a row in both splits.
    """
    _check_split_args(n_sft, n_rl, think_prefix, chat_template_kwargs)
    tok = _load_tokenizer(tokenizer)
    loaded = load_source(source, hub_split=hub_split, field_map=field_map, allow_extra_columns=allow_extra_columns)
    gen_prefix = generation_prefix_for(think_prefix)

    dropped: list[tuple[int, str, str]] = []  # (original index, reason, detail); every step appends its drops
    valid = _valid_rows(loaded.rows, think_prefix, dropped, progress=progress)
    # Length filter before de-duplication, so an over-long first copy does not also knock out a fitting later one.
    valid, length_check, cutoff = _length_filter(valid, tok, cutoff_tokens, gen_prefix, chat_template_kwargs,
                                                 dropped, progress=progress)
    if dedupe_prompts:
        valid = _dedupe(valid, dropped)
    sft, rl = _draw(valid, n_sft, n_rl, seed, what=f"{source} ({len(dropped)} of {len(loaded.rows)} dropped)")

    out = Path(out_dir)
    files = _write_split(out, sft, rl, dropped)
    counts = Counter(reason for _, reason, _ in dropped)
    report = SplitReport(
        source=str(source),
        input_files=loaded.files,
        n_input=len(loaded.rows),
        n_valid=len(valid),
        n_sft=len(sft),
        n_rl=len(rl),
        n_unused=len(valid) - len(sft) - len(rl),
        dropped={r: counts.get(r, 0) for r in DROP_REASONS},
        n_dropped=len(dropped),
        seed=seed,
        think_prefix=think_prefix,
        generation_prefix=gen_prefix,
        length_check=length_check,
        cutoff_tokens=cutoff_tokens,
        cutoff=cutoff,
        token_stats=_token_stats({"sft": sft, "rl": rl}, tok),
        extra_columns_ignored=loaded.extra_columns,
        field_map=dict(field_map or {}),
        files=files,
        sha256={name: sha256_file(out / fn) for name, fn in files.items()},
        sft_ids=[i for i, _ in sft],
        rl_ids=[i for i, _ in rl],
        out_dir=str(out),
    )
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n")
    if progress:
        print(
            f"[split] {report.n_input} rows -> sft {report.n_sft}, rl {report.n_rl}, unused {report.n_unused}, "
            f"dropped {report.n_dropped} {dict((k, v) for k, v in report.dropped.items() if v)} -> {out}"
        )
    if cutoff is not None:
        print(f"[split] cutoff: {cutoff['note']}", flush=True)
    return report


def cutoff_report(lengths: list[int], cutoff_tokens: int, paper_cutoff: int = PAPER_CUTOFF_TOKENS) -> dict[str, Any]:
    """The length cutoff on the data it is applied to: of the `lengths` (chat-templated prompt + response tokens
    of every schema-valid row), how many exceed `cutoff_tokens` (dropped), how many of those the paper's
    `paper_cutoff` would have kept (the departure's own cost), and the length quantiles; `note` says it in one
    line (printed by the split stage, shown by the report)."""
    n = len(lengths)
    over = sum(x > cutoff_tokens for x in lengths)
    over_paper = sum(x > paper_cutoff for x in lengths)
    by_departure = sum(cutoff_tokens < x <= paper_cutoff for x in lengths)
    srt = sorted(lengths)

    def q(f: float) -> int | None:
        return srt[min(n - 1, int(f * n))] if n else None

    share = over / n if n else 0.0
    out = {
        "cutoff_tokens": int(cutoff_tokens),
        "paper_cutoff_tokens": int(paper_cutoff),
        "departs_from_paper": int(cutoff_tokens) != int(paper_cutoff),
        "n_rows_measured": n,
        "n_over_cutoff": over,
        "share_over_cutoff": share,
        "n_over_paper_cutoff": over_paper,
        "n_dropped_by_departure": by_departure if cutoff_tokens < paper_cutoff else 0,
        "share_dropped_by_departure": (by_departure / n if n else 0.0) if cutoff_tokens < paper_cutoff else 0.0,
        "length_tokens": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": srt[-1] if n else None},
    }
    if out["departs_from_paper"]:
        out["note"] = (f"cutoff {cutoff_tokens} tokens departs from the paper's {paper_cutoff}: it drops {over} of "
                       f"{n} rows ({100 * share:.2f}%), {out['n_dropped_by_departure']} of them "
                       f"({100 * out['share_dropped_by_departure']:.2f}%) rows the paper's cutoff keeps "
                       f"(length p50 {out['length_tokens']['p50']}, p99 {out['length_tokens']['p99']}, "
                       f"max {out['length_tokens']['max']})")
    else:
        out["note"] = f"cutoff {cutoff_tokens} tokens (the paper's) drops {over} of {n} rows ({100 * share:.2f}%)"
    return out


# -- the steps of split_dataset -------------------------------------------------------------------
Rows = list[tuple[int, dict[str, Any]]]  # (original index, cleaned row)


def _check_split_args(n_sft: int, n_rl: int | None, think_prefix: str, chat_template_kwargs: dict | None) -> None:
    if think_prefix not in THINK_PREFIX_MODES:
        raise DataError(f"unknown think_prefix mode {think_prefix!r} (expected one of {list(THINK_PREFIX_MODES)})")
    if n_sft < 1:
        raise DataError(f"n_sft must be >= 1, got {n_sft}")
    if n_rl is not None and n_rl < 1:
        raise DataError(f"n_rl must be >= 1 or None, got {n_rl}")
    if chat_template_kwargs and "generation_prefix" in chat_template_kwargs:
        raise DataError("chat_template_kwargs must not set 'generation_prefix': the split derives it from think_prefix")


def _valid_rows(rows: list[Any], think_prefix: str, dropped: list, *, progress: bool) -> Rows:
    """Schema-valid rows with `content` = the trace under the think-prefix mode; the others dropped with a reason."""
    valid: Rows = []
    for i, row in enumerate(tqdm(rows, desc="validate", disable=not progress)):
        if row is _INVALID_JSON:
            dropped.append((i, "invalid_json", drop_detail(None, "invalid_json")))
            continue
        clean, reason = validate_row(row, think_prefix=think_prefix)
        if reason is not None:
            dropped.append((i, reason, drop_detail(row, reason)))
            continue
        clean["content"], _ = apply_think_prefix(clean["trace"], think_prefix)
        valid.append((i, clean))
    return valid


def _length_filter(valid: Rows, tok: Any, cutoff_tokens: int, gen_prefix: str, chat_template_kwargs: dict | None,
                   dropped: list, *, progress: bool) -> tuple[Rows, str]:
    """Rows whose chat-templated length fits `cutoff_tokens` (token counts stored on each row), the report's
    `length_check` line and the cutoff measured on these rows (`cutoff_report`); without a tokenizer every row
    is kept and the report says the check was skipped."""
    if tok is None:
        length_check = "skipped: no tokenizer given (no over_length filter, no token stats)"
        print(f"[split] WARNING: length check {length_check}")
        return valid, length_check, None
    p_len, t_len = token_lengths(
        tok,
        [r["prompt"] for _, r in valid],
        [r["content"] for _, r in valid],
        generation_prefix=gen_prefix,
        chat_template_kwargs=chat_template_kwargs,
        progress=progress,
    )
    kept = []
    for (i, r), pl, tl in zip(valid, p_len, t_len):
        if pl + tl > cutoff_tokens:
            dropped.append((i, "over_length", f"{pl + tl} tokens > {cutoff_tokens}"))
        else:
            r["prompt_tokens"], r["target_tokens"] = pl, tl
            kept.append((i, r))
    cutoff = cutoff_report([pl + tl for pl, tl in zip(p_len, t_len)], cutoff_tokens)
    return kept, f"applied: cutoff_tokens={cutoff_tokens} with tokenizer {getattr(tok, 'name_or_path', '?')}", cutoff


def _dedupe(valid: Rows, dropped: list) -> Rows:
    """The first row of each normalised user prompt; later copies dropped as `duplicate_prompt`."""
    first_seen: dict[str, int] = {}
    kept = []
    for i, r in valid:
        key = normalize_prompt_text(user_text(r["prompt"]))
        if key in first_seen:
            dropped.append((i, "duplicate_prompt", f"same prompt as row {first_seen[key]}"))
        else:
            first_seen[key] = i
            kept.append((i, r))
    return kept


def _draw(valid: Rows, n_sft: int, n_rl: int | None, seed: int, *, what: str) -> tuple[Rows, Rows]:
    """One seeded permutation: its first `n_sft` rows are SFT, the next `n_rl` (default: all the rest) RL, each in
    source order; checked disjoint by index and by prompt."""
    n_valid = len(valid)
    need = n_sft + (n_rl or 1)
    if need > n_valid:
        raise DataError(
            f"n_sft={n_sft}"
            + (f" + n_rl={n_rl}" if n_rl else " + at least 1 RL row")
            + f" exceeds the {n_valid} valid rows of {what}"
        )
    perm = np.random.default_rng(seed).permutation(n_valid)
    sft_pos = sorted(perm[:n_sft].tolist())
    rl_pos = sorted(perm[n_sft : n_sft + n_rl].tolist() if n_rl is not None else perm[n_sft:].tolist())
    sft = [valid[p] for p in sft_pos]
    rl = [valid[p] for p in rl_pos]
    check_disjoint([i for i, _ in sft], [i for i, _ in rl], [user_text(r["prompt"]) for _, r in sft],
                   [user_text(r["prompt"]) for _, r in rl])
    return sft, rl


def _write_split(out: Path, sft: Rows, rl: Rows, dropped: list) -> dict[str, str]:
    """The SFT parquet (verl multi-turn layout), the RL parquet (verl RL layout), both id lists and the dropped rows
    (sorted by index); returns name -> file name."""
    out.mkdir(parents=True, exist_ok=True)
    sft_table = pa.Table.from_pylist(
        [
            {
                "id": i,
                "data_source": r["data_source"],
                "messages": r["prompt"] + [{"role": "assistant", "content": r["content"]}],
                "ground_truth": r["ground_truth"],
            }
            for i, r in sft
        ],
        schema=SFT_SCHEMA,
    )
    rl_table = pa.Table.from_pylist(
        [
            {
                "data_source": r["data_source"],
                "prompt": r["prompt"],
                "ability": r["ability"],
                "reward_model": {"ground_truth": r["ground_truth"], "style": "rule"},
                "extra_info": {"index": i, "split": "rl_train"},
            }
            for i, r in rl
        ],
        schema=RL_SCHEMA,
    )
    pq.write_table(sft_table, out / SFT_FILE)
    pq.write_table(rl_table, out / RL_FILE)
    (out / SFT_IDS_FILE).write_text(json.dumps([i for i, _ in sft]) + "\n")
    (out / RL_IDS_FILE).write_text(json.dumps([i for i, _ in rl]) + "\n")
    dropped.sort()
    with (out / DROPPED_FILE).open("w", encoding="utf-8") as f:
        for i, reason, detail in dropped:
            f.write(json.dumps({"index": i, "reason": reason, "detail": detail}) + "\n")
    return {"sft": SFT_FILE, "rl": RL_FILE, "sft_ids": SFT_IDS_FILE, "rl_ids": RL_IDS_FILE, "dropped": DROPPED_FILE}


def _token_stats(splits: dict[str, Rows], tok: Any) -> dict[str, Any]:
    """Prompt / target token-length statistics per split (None per split without a tokenizer)."""
    return {name: None if tok is None else {"prompt_tokens": _stats([r["prompt_tokens"] for _, r in rows]),
                                            "target_tokens": _stats([r["target_tokens"] for _, r in rows])}
            for name, rows in splits.items()}


def read_split_report(path: str | Path) -> dict[str, Any]:
    """Load ``split_report.json``: ``path`` is the file itself (the split stage's ``report`` output, what every
    later stage passes: ``read_split_report(ctx.upstream("split")["report"])``) or the split's output directory.
    The one reader of the split report; a missing file is a ``DataError`` naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    if not path.exists():
        raise DataError(f"split report not found: {path}; run the split stage first (stage=split)")
    return json.loads(path.read_text())
