"""Evaluation-set loaders: verl RL-layout parquet (AIME24/25, AMC, MATH-500, ...) and jsonl (HMMT Feb 2025).

Every loader returns :class:`EvalSet` objects with a uniform list of :class:`EvalProblem`
(benchmark, problem_id, messages = [system, user], ground_truth, data_source).

* Parquet in verl's RL layout (like ``luffy_valid_all.parquet``: ``data_source``, ``prompt`` [system, user],
  ``reward_model.ground_truth``): rows are selected per benchmark by ``data_source`` through a mapping
  ``benchmark -> data_source`` (default :data:`DEFAULT_PARQUET_BENCHMARKS`, e.g. ``aime24 <- aime``).
  Copies of a problem are identical rows (the shared file holds each AIME/AMC problem 32 times); they are
  de-duplicated by ``(data_source, prompt messages)`` keeping the first, and the number removed is reported.
  Two copies with the same prompt but different ground truths raise :class:`DataError`.
* jsonl with configurable field names (HMMT Feb 2025: ``question`` / ``ref_answer``): the user message is
  the question, the system message is ``system_prompt`` (default: the OpenR1 training system prompt, so
  eval prompts match the training distribution).

Nothing loads silently wrong: a file whose first bytes contradict its declared format (a jsonl declared as
parquet or the reverse) raises one line naming the file and the expected format; a parquet in which no
requested ``data_source`` has a problem raises naming the values it does hold; unknown keys in a benchmark
entry (:func:`specs_from_benchmarks`) or a loader spec (:func:`load_eval_sets`) raise listing the allowed
ones; a parquet benchmark's ``system_prompt`` replaces the file's system message.

* A hub dataset (``hub: {id, revision, split, config}`` + ``question_field`` / ``answer_field``), e.g. the public
  copies of AIME 2024 (``HuggingFaceH4/aime_2024``): read with ``datasets`` (``load_dataset_builder`` ->
  ``download_and_prepare`` -> ``as_dataset``, what ``load_dataset`` does). ``hub.id`` may also be a local parquet /
  jsonl file or a folder in a hub repository's layout: the same ``datasets`` code path reads it (the tests use such
  local files; nothing downloads unless the id is a hub name that is not cached). The set records the revision
  ``datasets`` resolved (the hub commit) or, for a local file, its content hash (``sha256:...``).

A benchmark entry's ``n_problems`` is the number of distinct problems the loader must find (AIME 2024: 30); another
count is a one-line :class:`DataError` naming both numbers, so a different copy or revision never evaluates silently.

``problem_id`` = first 16 hex digits of sha256 of the user message text (stable across runs and files).
Rows with a missing / empty answer are *not* evaluated but counted (``n_missing_answer``) and listed
(``missing_answer_rows``) in the set, and a warning is printed. Numeric (int/float) jsonl / hub answers are
converted with ``str`` (an integral float as an integer: ``27.0`` -> ``"27"``, as AMC copies store them); any other
non-string answer raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .schema import SYSTEM_PROMPT, DataError, prompt_id

DEFAULT_PARQUET_BENCHMARKS: dict[str, str] = {
    "aime24": "aime",
    "aime25": "aime25",
    "amc": "amc",
    "math500": "math",
    "minerva": "minerva",
    "olympiad_bench": "olympiad_bench",
}


@dataclass(frozen=True)
class EvalProblem:
    benchmark: str
    problem_id: str
    messages: tuple[dict[str, str], ...]
    ground_truth: str
    data_source: str

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class EvalSet:
    benchmark: str
    source: str
    problems: list[EvalProblem]
    n_rows: int  # rows read for this benchmark, before de-duplication
    n_duplicates_removed: int
    n_missing_answer: int
    missing_answer_rows: list[int] = field(default_factory=list)  # row indices in the source file
    # hub sets: the revision asked for, the one datasets resolved (commit) or a local file's content hash
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.problems)

    def summary(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "source": self.source,
            "n_rows": self.n_rows,
            "n_problems": len(self.problems),
            "n_duplicates_removed": self.n_duplicates_removed,
            "n_missing_answer": self.n_missing_answer,
        } | self.provenance


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if type(value).__name__ == "ndarray":
        value = value.tolist()
    if not isinstance(value, list | tuple) or not value:
        raise DataError(f"{where}: prompt is not a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: prompt message is not {{'role': str, 'content': str}}: {m!r}"[:200])
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise DataError(f"{where}: last prompt message has role {out[-1]['role']!r}, expected 'user'")
    return tuple(out)


def _answer(value: Any, where: str) -> str | None:
    """Normalised ground truth or None when missing/empty."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise DataError(f"{where}: answer has type bool")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: answer has type {type(value).__name__}, expected str")
    return value if value.strip() else None


def _warn_missing(es: EvalSet) -> None:
    if es.n_missing_answer:
        print(
            f"[eval_sets] WARNING: {es.benchmark}: {es.n_missing_answer} rows without an answer are not evaluated "
            f"(rows {es.missing_answer_rows[:10]}{'...' if es.n_missing_answer > 10 else ''})"
        )


_PARQUET_MAGIC = b"PAR1"


def _looks_like(p: Path) -> str:
    """"parquet", "jsonl" (first non-blank byte '{'), "empty" or "other" from the first bytes of ``p``."""
    with p.open("rb") as f:
        head = f.read(4096)
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    stripped = head.lstrip()
    if not stripped:
        return "empty"
    return "jsonl" if stripped[:1] == b"{" else "other"


def _check_format(p: Path, expected: str) -> None:
    got = _looks_like(p)
    if got == expected:
        return
    other = {"parquet": "jsonl", "jsonl": "parquet"}[expected]
    hint = f"it looks like {got}: set format: {got}" if got in ("parquet", "jsonl") else f"it is {got}"
    raise DataError(f"{p}: expected a {expected} file (format: {expected}), but {hint}"
                    + ("" if got == other else f" (or point path at a {expected} file)"))


def load_eval_parquet(
    path: str | Path,
    *,
    benchmarks: dict[str, str] | None = None,
    system_prompt: str | None = None,
) -> dict[str, EvalSet]:
    """Load benchmarks from a verl RL-layout parquet.

    Args:
        path: the parquet file.
        benchmarks: benchmark name -> ``data_source`` value (default :data:`DEFAULT_PARQUET_BENCHMARKS`,
            restricted to the data sources present in the file). An explicitly requested data source that is
            absent from the file raises.
        system_prompt: replace the stored system message (or add one) with this text; ``None`` keeps the
            file's messages unchanged.

    Returns: ``{benchmark: EvalSet}`` in the order of ``benchmarks``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"eval parquet not found: {p}")
    _check_format(p, "parquet")
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow's ArrowInvalid / OSError on a damaged file
        raise DataError(f"{p}: cannot read as parquet ({type(e).__name__}: {str(e)[:200]})") from None
    for col in ("data_source", "prompt", "reward_model"):
        if col not in table.column_names:
            raise DataError(f"missing required column {col!r} in {p} (columns: {table.column_names})")
    rows = table.select(["data_source", "prompt", "reward_model"]).to_pylist()
    present = {r["data_source"] for r in rows}
    if benchmarks is None:
        benchmarks = {b: ds for b, ds in DEFAULT_PARQUET_BENCHMARKS.items() if ds in present}
        if not benchmarks:
            raise DataError(
                f"{p}: no rows of a default benchmark (data_source values {sorted(DEFAULT_PARQUET_BENCHMARKS.values())}"
                f"); the file holds data_source values {sorted(map(str, present))[:20]}: pass benchmarks="
                "{name: data_source} (recipes: data_source: <value>)"
            )
    else:
        for b, ds in benchmarks.items():
            if ds not in present:
                raise DataError(f"benchmark {b!r}: data_source {ds!r} not in {p} (present: {sorted(present)})")
    out: dict[str, EvalSet] = {}
    for bench, ds in benchmarks.items():
        problems: list[EvalProblem] = []
        seen: dict[tuple, str] = {}  # (data_source, messages) -> ground truth of the first copy
        n_rows = n_dup = 0
        missing: list[int] = []
        for i, r in enumerate(rows):
            if r["data_source"] != ds:
                continue
            n_rows += 1
            where = f"{p} row {i}"
            msgs = _messages(r["prompt"], where)
            if system_prompt is not None:
                msgs = ({"role": "system", "content": system_prompt},) + tuple(m for m in msgs if m["role"] != "system")
            rm = r["reward_model"]
            gt = _answer(rm.get("ground_truth") if isinstance(rm, dict) else None, where)
            key = (ds, tuple((m["role"], m["content"]) for m in msgs))
            if key in seen:
                if seen[key] != gt:
                    raise DataError(
                        f"{where}: duplicate prompt of {bench} with a different ground truth ({seen[key]!r} vs {gt!r})"
                    )
                n_dup += 1
                continue
            seen[key] = gt
            if gt is None:
                missing.append(i)
                continue
            problems.append(EvalProblem(bench, prompt_id(msgs[-1]["content"]), msgs, gt, ds))
        es = EvalSet(bench, str(p), problems, n_rows, n_dup, len(missing), missing)
        if not problems:
            raise DataError(f"benchmark {bench!r}: data_source {ds!r} has {n_rows} rows in {p} but none with an "
                            "answer (reward_model.ground_truth): nothing to evaluate")
        _warn_missing(es)
        out[bench] = es
    return out


def load_eval_jsonl(
    path: str | Path,
    *,
    benchmark: str,
    question_field: str = "question",
    answer_field: str = "ref_answer",
    system_prompt: str = SYSTEM_PROMPT,
    data_source: str | None = None,
) -> EvalSet:
    """Load one benchmark from jsonl whose rows carry the question / answer under the given field names.

    Rows are de-duplicated by question text. A row without ``question_field`` (or with an empty one) raises
    naming the row; a row without an answer is counted in ``n_missing_answer``. If no row has
    ``question_field`` / ``answer_field`` at all, raises naming the field.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"eval jsonl not found: {p}")
    _check_format(p, "jsonl")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: expected a UTF-8 jsonl file (format: jsonl), but byte {e.start} is not UTF-8") from None
    rows: list[dict[str, Any]] = []
    for ln, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {ln + 1}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p} line {ln + 1}: not a JSON object")
        rows.append(obj)
    return _field_set(rows, str(p), benchmark=benchmark, question_field=question_field, answer_field=answer_field,
                      system_prompt=system_prompt, data_source=data_source)


def _field_set(rows: list[dict[str, Any]], p: str, *, benchmark: str, question_field: str, answer_field: str,
               system_prompt: str, data_source: str | None) -> EvalSet:
    """An :class:`EvalSet` from rows that carry the question / answer under the given field names (jsonl, hub)."""
    for fld in (question_field, answer_field):
        if rows and not any(fld in r for r in rows):
            raise DataError(f"field {fld!r} not found in any row of {p} (fields: {sorted(set().union(*rows))})")
    ds = data_source or benchmark
    problems: list[EvalProblem] = []
    seen: dict[str, str | None] = {}
    n_dup = 0
    missing: list[int] = []
    for i, r in enumerate(rows):
        where = f"{p} row {i}"
        q = r.get(question_field)
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: field {question_field!r} missing or not a non-empty string")
        gt = _answer(r.get(answer_field), where)
        if q in seen:
            if seen[q] != gt:
                raise DataError(f"{where}: duplicate question with a different answer ({seen[q]!r} vs {gt!r})")
            n_dup += 1
            continue
        seen[q] = gt
        if gt is None:
            missing.append(i)
            continue
        msgs = ({"role": "system", "content": system_prompt}, {"role": "user", "content": q})
        problems.append(EvalProblem(benchmark, prompt_id(q), msgs, gt, ds))
    es = EvalSet(benchmark, p, problems, len(rows), n_dup, len(missing), missing)
    if not problems:
        raise DataError(f"benchmark {benchmark!r}: {p} has {len(rows)} rows but none with a question and an "
                        f"answer ({question_field!r} / {answer_field!r}): nothing to evaluate")
    _warn_missing(es)
    return es


# Keys of a benchmark's `hub:` block: the dataset (a hub name, or a local file / folder in a hub layout), the hub
# revision (branch, tag or commit; hub names only), the split and the dataset's config (subset) name.
HUB_KEYS = ("id", "revision", "split", "config")
# Default field names of a hub set: the public AIME / AMC / HMMT copies use problem / answer.
HUB_FIELDS = {"question_field": "problem", "answer_field": "answer"}
# Keys a loader spec (load_eval_sets) may hold, per format.
SPEC_KEYS = {
    "parquet": ("path", "format", "benchmarks", "system_prompt", "n_problems"),
    "jsonl": ("path", "format", "benchmark", "question_field", "answer_field", "system_prompt", "data_source",
              "n_problems"),
    "hub": ("hub", "format", "benchmark", "question_field", "answer_field", "system_prompt", "data_source",
            "n_problems", "cache_dir"),
}
# Keys a benchmark entry of recipes/benchmarks/*.yaml may hold, per format ("policy" is the reward's,
# "n_samples" the eval stage's: that benchmark's samples per problem; "n_problems" the count the loader must find).
BENCHMARK_KEYS = {
    "parquet": ("path", "format", "data_source", "system_prompt", "policy", "n_samples", "n_problems"),
    "jsonl": ("path", "format", "question_field", "answer_field", "system_prompt", "data_source", "policy",
              "n_samples", "n_problems"),
    "hub": ("hub", "question_field", "answer_field", "system_prompt", "data_source", "policy", "n_samples",
            "n_problems"),
}

_DATASETS_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def content_hash(path: str | Path) -> str:
    """``sha256:<hex>`` of a file, or of a folder's files (relative name + content; hidden files skipped)."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts))
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _is_local(ident: str) -> bool:
    p = Path(ident).expanduser()
    return p.exists() or bool(p.suffix in _DATASETS_BUILDERS) or ident.startswith((".", "/", "~"))


def load_eval_hub(
    hub: dict[str, Any],
    *,
    benchmark: str,
    question_field: str = HUB_FIELDS["question_field"],
    answer_field: str = HUB_FIELDS["answer_field"],
    system_prompt: str = SYSTEM_PROMPT,
    data_source: str | None = None,
    cache_dir: str | None = None,
) -> EvalSet:
    """Load one benchmark through ``datasets`` from a hub name or a local file / folder in a hub layout.

    ``hub``: ``id`` (required), ``revision`` (hub names only; a branch, tag or commit), ``split`` (default
    ``train``), ``config`` (the dataset's subset name). A local file is read with datasets' ``parquet`` / ``json``
    builder under the requested split's name; a local folder (``data/test-00000-of-00001.parquet``, ...) and a hub
    name with the dataset's own layout. Rows become problems as in :func:`load_eval_jsonl`. The set's
    ``provenance`` records ``hub_id``, ``revision`` (asked), ``revision_resolved`` (the hub commit ``datasets``
    loaded) or ``content_hash`` (local). Offline (``HF_DATASETS_OFFLINE=1``) a hub name must be in the cache.
    """
    hub = dict(hub or {})
    where = f"benchmark {benchmark!r} hub"
    unknown = sorted(set(hub) - set(HUB_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {list(HUB_KEYS)}")
    ident = str(hub.get("id") or "").strip()
    if not ident:
        raise DataError(f"{where}: no 'id' (a hub dataset name such as HuggingFaceH4/aime_2024, or a local file)")
    split = str(hub.get("split") or "train")
    revision = hub.get("revision")
    config = hub.get("config")
    import datasets

    prov: dict[str, Any] = {"hub_id": ident, "split": split}
    if _is_local(ident):
        p = Path(ident).expanduser()
        if not p.exists():
            raise DataError(f"{where}: local dataset {p} not found")
        if revision not in (None, ""):
            raise DataError(f"{where}: revision={revision!r} is for hub names; {p} is a local path (its content "
                            "hash is recorded instead)")
        if p.is_file():
            builder_name = _DATASETS_BUILDERS.get(p.suffix)
            if builder_name is None:
                raise DataError(f"{where}: {p} has suffix {p.suffix!r}; expected one of {sorted(_DATASETS_BUILDERS)}")
            if builder_name in ("parquet", "json"):
                _check_format(p, "parquet" if builder_name == "parquet" else "jsonl")
            args = {"path": builder_name, "data_files": {split: str(p)}}
        else:
            args = {"path": str(p)}
        prov["content_hash"] = content_hash(p)
    else:
        args = {"path": ident, "revision": revision}
        prov["revision"] = revision
    if config:
        args["name"] = str(config)
    try:
        builder = datasets.load_dataset_builder(**args, cache_dir=cache_dir)
        builder.download_and_prepare()
        data = builder.as_dataset(split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (hub, offline, split, schema)
        msg = " ".join(str(e).split())[:300]
        raise DataError(f"{where}: cannot load {ident!r} (split {split!r}, revision {revision!r}) with datasets: "
                        f"{type(e).__name__}: {msg}") from None
    if "content_hash" not in prov:
        prov["revision_resolved"] = str(builder.hash)  # the hub commit datasets loaded (module hash)
    rows = data.to_list()
    source = ident + (f"@{revision}" if revision else "") + f"[{split}]"
    es = _field_set(rows, source, benchmark=benchmark, question_field=question_field, answer_field=answer_field,
                    system_prompt=system_prompt, data_source=data_source)
    es.provenance = prov
    return es


def _format_of(spec: dict[str, Any], where: str) -> str:
    if spec.get("hub") is not None:
        if spec.get("path") not in (None, ""):
            raise DataError(f"{where}: both 'path' and 'hub' are set; keep one (a local verl/jsonl file, or a "
                            "hub dataset / hub-layout file under hub.id)")
        return "hub"
    if spec.get("path") in (None, ""):
        raise DataError(f"{where}: no 'path' (the {spec.get('format') or 'parquet/jsonl'} file to read) and no 'hub' "
                        "(a hub dataset: {id, revision, split})")
    fmt = spec.get("format") or Path(str(spec["path"])).suffix.lstrip(".")
    if fmt not in ("parquet", "jsonl"):
        raise DataError(f"{where}: unknown format {fmt!r} for {spec['path']} (expected parquet or jsonl; "
                        "set format: when the file name has another suffix)")
    return fmt


def _check_keys(spec: dict[str, Any], allowed: tuple[str, ...], where: str, fmt: str) -> None:
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown} for a {fmt} benchmark; allowed: {list(allowed)}")


def specs_from_benchmarks(benchmarks: dict[str, dict]) -> list[dict[str, Any]]:
    """recipes' ``benchmarks`` mapping (name -> entry) -> :func:`load_eval_sets` specs.

    Entry keys (:data:`BENCHMARK_KEYS`): ``path``, ``format`` (default: the file suffix), ``system_prompt``
    (replaces the stored system message of a parquet; the system message of a jsonl, default the training
    system prompt), ``policy`` (the reward's answer policy, not read here), ``n_samples`` (the eval stage's
    samples per problem for this benchmark, not read here), ``n_problems`` (distinct problems the loader must
    find); parquet: ``data_source`` (default: the benchmark name); jsonl: ``question_field``, ``answer_field``,
    ``data_source``; hub (``hub: {id, revision, split, config}`` instead of ``path``): ``question_field``
    (default ``problem``), ``answer_field`` (default ``answer``), ``data_source``. A misspelt key
    (``answer_feild``) raises listing the allowed ones instead of silently falling back to a default.
    """
    specs: list[dict[str, Any]] = []
    for name, b in (benchmarks or {}).items():
        b = dict(b or {})
        where = f"benchmark {name!r}"
        fmt = _format_of(b, where)
        _check_keys(b, BENCHMARK_KEYS[fmt], where, fmt)
        if fmt == "parquet":
            spec = {"path": b["path"], "format": "parquet", "benchmarks": {name: b.get("data_source") or name}}
            if b.get("system_prompt") is not None:
                spec["system_prompt"] = b["system_prompt"]
        elif fmt == "jsonl":
            spec = {"path": b["path"], "format": "jsonl", "benchmark": name}
            for k in ("question_field", "answer_field", "system_prompt", "data_source"):
                if b.get(k) is not None:
                    spec[k] = b[k]
        else:
            spec = {"hub": dict(b["hub"]), "format": "hub", "benchmark": name}
            for k in ("question_field", "answer_field", "system_prompt", "data_source"):
                if b.get(k) is not None:
                    spec[k] = b[k]
        if b.get("n_problems") is not None:
            spec["n_problems"] = b["n_problems"]
        specs.append(spec)
    return specs


def _check_count(es: EvalSet, expected: Any) -> None:
    found = len(es.problems) + es.n_missing_answer
    if int(expected) != found:
        raise DataError(f"benchmark {es.benchmark!r}: expected {int(expected)} problems (n_problems), found {found} "
                        f"in {es.source}: another copy, revision or split of the set? (fix the source, or n_problems)")


def load_eval_sets(specs: list[dict[str, Any]]) -> dict[str, EvalSet]:
    """Load several sets from plain-dict specs (what a Hydra config list turns into).

    Each spec: ``{"path": ..., "format": "parquet" | "jsonl" (default: from the suffix), ...}`` or
    ``{"hub": {...}, ...}``; parquet specs take ``benchmarks`` (name -> data_source) and ``system_prompt``; jsonl
    specs take ``benchmark``, ``question_field``, ``answer_field``, ``system_prompt``, ``data_source``; hub specs
    those and ``cache_dir`` (:data:`SPEC_KEYS`; another key raises listing them). ``n_problems`` (an int, or a
    mapping benchmark -> int for a parquet spec of several) is checked after de-duplication. A benchmark name
    defined twice raises.
    """
    out: dict[str, EvalSet] = {}
    for i, spec in enumerate(specs):
        spec = dict(spec)
        where = f"eval set spec #{i} ({spec.get('path') or (spec.get('hub') or {}).get('id')})"
        fmt = _format_of(spec, where)
        _check_keys(spec, SPEC_KEYS[fmt], where, fmt)
        expected = spec.pop("n_problems", None)
        spec.pop("format", None)
        if fmt == "parquet":
            path = spec.pop("path")
            got = load_eval_parquet(path, **spec)
        elif fmt == "jsonl":
            path = spec.pop("path")
            es = load_eval_jsonl(path, **spec)
            got = {es.benchmark: es}
        else:
            es = load_eval_hub(spec.pop("hub"), **spec)
            got = {es.benchmark: es}
        if expected is not None:
            if not isinstance(expected, dict):
                if len(got) != 1:
                    raise DataError(f"{where}: n_problems={expected} for {len(got)} benchmarks ({sorted(got)}); "
                                    "give a mapping benchmark -> count")
                expected = {next(iter(got)): expected}
            for name, n in expected.items():
                if name not in got:
                    raise DataError(f"{where}: n_problems names {name!r}, which this spec does not load")
                _check_count(got[name], n)
        for name, es in got.items():
            if name in out:
                raise DataError(f"benchmark {name!r} defined twice ({out[name].source} and {es.source})")
            out[name] = es
    return out


def write_eval_parquet(sets: dict[str, EvalSet] | list[EvalSet], path: str | Path) -> Path:
    """Write de-duplicated problems back in verl's RL layout (data_source = benchmark name), e.g. for verl's
    validation data; extra_info.index is the position within its benchmark."""
    from .schema import RL_SCHEMA
    from .synth import write_parquet

    items = list(sets.values()) if isinstance(sets, dict) else list(sets)
    rows = [
        {
            "data_source": es.benchmark,
            "prompt": list(pr.messages),
            "ability": "math",
            "reward_model": {"ground_truth": pr.ground_truth, "style": "rule"},
            "extra_info": {"index": j, "split": "test"},
        }
        for es in items
        for j, pr in enumerate(es.problems)
    ]
    return write_parquet(rows, path, RL_SCHEMA)
