"""Rule-based math reward for DAPO RL and eval: the final boxed answer, normalised, checked with math-verify
under a per-benchmark answer policy, in a killable worker pool.

The scoring package, by concern: :mod:`~eksft_pipeline.scoring.answer` (extraction from the completion),
:mod:`~eksft_pipeline.scoring.normalize` (answer-string rewrites), :mod:`~eksft_pipeline.scoring.policy` (the
debatable cases, per benchmark), :mod:`~eksft_pipeline.scoring.verify` (math-verify in the worker processes, and
the "plain math-verify" reference), :mod:`~eksft_pipeline.scoring.pool` (the killable worker processes),
:mod:`~eksft_pipeline.scoring.cache` (the verdict LRU), :mod:`~eksft_pipeline.scoring.stats` (the counters), this
module (options, gold preparation, the scoring loop, the public API), and
``scripts/devtools/verifier_corpus.py`` (the labelled corpus the verifier is measured on, a development tool).

Public API
----------
``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict``
    verl's custom reward signature. Returns ``{"score", "acc", "pred", "reason", "verify_failed"}``:
    ``score`` is ``correct_score`` (default +1.0) or ``wrong_score`` (default -1.0, as DAPO); ``acc`` is
    1.0/0.0; ``pred`` is the extracted answer ("" if none); ``verify_failed`` is 1.0 when the reason is
    "timeout", "error" or "gold_unparseable" (the score says nothing about the model), which verl's
    validation logs as ``val-aux/<data_source>/verify_failed/mean@N`` next to ``acc``; ``reason`` is one
    of "ok" (verified; ``acc`` says right or wrong), "no_answer" (no/empty/unclosed last box, or no
    ``</think>`` under ``require_think_close``), "pred_too_long", "pred_too_deep", "pred_unparseable",
    "gold_unparseable" (also: a gold that violates the answer policy, e.g. not an integer 0-999 for AIME),
    "timeout", "error". Every reason other than "ok" scores ``wrong_score`` and is counted (see
    :func:`reward_stats`), so a broken gold or verifier shows up as a count, never as a silent zero.
    Every call returns the same five keys: verl's reward loop builds its extra-info arrays from the
    keys of the first sample and indexes every other sample with them.
``score_batch(items, **kwargs) -> list[dict]``
    ``items``: tuples ``(data_source, solution_str, ground_truth)`` or dicts with those keys and an
    optional ``policy`` (a policy name, a dict of fields or an ``AnswerPolicy``; overrides the ``policy``
    option for that item). Extracts and normalises in the calling process, looks up the cache,
    de-duplicates the remaining (prediction, gold, policy) triples and fans them out over the worker pool.
``reward_stats() -> dict`` / ``reset_reward_stats()``
    Process-wide counters: ``items``, ``correct``, ``by_reason`` (count per reason), ``cache_hits``
    (samples answered from the LRU cache), ``cache_misses`` (distinct pairs not in it), ``dedup_hits``
    (samples that shared a pair with an earlier sample of the same batch), ``int_fast_path`` (integer vs
    integer literals decided in the parent, see :func:`_int_fast_path`), ``verify_calls`` (pairs sent
    to workers), ``worker_starts``, ``worker_kills``,
    ``gold_unparseable_examples`` (first distinct golds), ``error_examples``.
``configure(n_workers=None, startup_timeout_s=None, memory_limit_mb=None, cache_size=None)``,
``clear_cache()``, ``shutdown_pool()``, ``worker_pids()``.

Keyword options (per call; in verl: ``+reward.custom_reward_function.reward_kwargs.NAME=VALUE``)
    ``correct_score=1.0``, ``wrong_score=-1.0``, ``extraction="boxed"`` (the project's verifier; or
    ``"math_verify"``: math-verify's own extraction on the answer region; or ``"plain"``: plain math-verify
    as verl's ``math_verify`` reward runs it, on the whole completion, no policy -- the reference of the
    eval audit and the benchmark), ``policy="auto"`` (the answer policy of every item: ``"auto"`` picks it
    from the item's ``data_source`` -- aime* -> ``aime``, amc* -> ``amc``, else ``math`` -- or a name, see
    :mod:`eksft_pipeline.scoring.policy`), ``after_think=True``, ``require_think_close=False``,
    ``max_pred_chars=1000``, ``max_brace_depth=10``, ``max_tail_chars=4000`` (math_verify mode),
    ``max_plain_chars=100000`` (plain mode: the completion's tail), ``timeout_s=5.0`` (wall clock per
    verified pair), ``use_cache=True``. An unknown option raises ``TypeError`` naming it (a config typo must not be
    silently ignored); verl's own extras (``reward_router_address``, ``reward_model_tokenizer``) are
    accepted and ignored. Extraction semantics: :mod:`eksft_pipeline.scoring.answer`.

Why worker processes
    math-verify's default timeouts use ``signal.alarm``; called from a thread (verl's reward loop runs
    ``compute_score`` via ``loop.run_in_executor`` inside async Ray actors) they raise ``ValueError``
    and callers that catch it score everything 0. Here ``parse``/``verify`` run with
    ``parsing_timeout=None``/``timeout_seconds=None`` in ``n_workers`` (default 2, env
    ``EKSFT_REWARD_WORKERS``) long-lived worker processes; the parent waits at most ``timeout_s`` per pair,
    then SIGKILLs the worker, starts a replacement and scores the pair "timeout". Workers are plain
    ``subprocess.Popen`` children (``python -P verify.py --serve``) talking over two pipes with
    ``multiprocessing.connection.Connection`` framing: like the "spawn" start method, but it also works
    inside daemonic multiprocessing children (which may not start ``multiprocessing`` processes) and
    never re-imports the caller's ``__main__``. Each worker caps its address space at
    ``memory_limit_mb`` (default 4096, ``EKSFT_REWARD_WORKER_MEM_MB``; 0 = no cap) so a runaway sympy
    expression hits MemoryError instead of the node's RAM, caps each item's CPU time (300 s, for a worker
    orphaned mid-item) and exits on EOF or when re-parented, so no worker outlives its caller.

Departures from calling math-verify directly
    The final answer is the last box plus the boxes joined to it by connectors only (several roots as
    several boxes), and both answer and gold are normalised (:mod:`eksft_pipeline.scoring.normalize`: thousands
    separators, choice labels, repeating decimals, percent, ``\\pm``, inequality unions); intervals and
    inequalities are compared (``allow_set_relation_comp``); decimals against non-terminating golds need 6
    significant digits instead of math-verify's 6-decimal rounding; the answer policy decides the
    debatable cases (:mod:`eksft_pipeline.scoring.policy`). On the held-out part of the labelled corpus this
    has a fraction of plain math-verify's false negatives and no more false positives (numbers:
    ``docs/benchmarks.md``). Integer-literal predictions against integer-literal golds (``-?[0-9]{1,15}``
    with an optional ``.0...``, most AIME/AMC pairs) are compared as integers in the caller
    (:func:`_int_fast_path`; the tests check agreement with math-verify), and integer-valued decimal golds
    such as AMC's ``142.0`` are read as integers (math-verify would score ``\\text{142}`` wrong against a
    Float gold).

Time bound
    A call returns after at most: waiting for a free worker (other callers' items, each bounded the same
    way) + worker start-up if the pool is cold (``startup_timeout_s``, default 120 s; sympy import is
    ~1-2 s) + ``timeout_s`` per unique pair it verifies on one worker. With a warm pool and no contention
    an adversarial completion costs <= ``timeout_s`` (+ ~10 ms to kill): oversized or deeply nested
    answers are rejected in the parent in O(``max_pred_chars``) without reaching sympy. A pair whose
    worker dies under it (OOM killer, segfault) is retried once on a replacement (+ start-up +
    ``timeout_s``), then scored "error".

Cache
    LRU (default 200,000 entries, ``configure(cache_size=...)``) keyed on ``(extraction mode,
    normalised prediction (plain mode: a hash of the completion), normalised gold tuple, policy options)``
    -> ``(status, correct, display)``; scores are applied after the lookup, so different
    ``correct_score``/``wrong_score`` share entries. Timeouts are cached too: the same
    pathological pair would time out again and each timeout costs a worker restart.

verl 0.9.1 wiring (reward loop, ``verl/experimental/reward_loop``)::

    reward.reward_manager.name=dapo \\
    reward.custom_reward_function.path=pkg://eksft_pipeline.scoring.reward \\
    reward.custom_reward_function.name=compute_score \\
    +reward.custom_reward_function.reward_kwargs.timeout_s=5 \\
    +reward.reward_kwargs.max_resp_len=${RESPONSE_LEN} \\
    +reward.reward_kwargs.overlong_buffer_cfg.enable=True \\
    +reward.reward_kwargs.overlong_buffer_cfg.len=4096 \\
    +reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0 \\
    +reward.reward_kwargs.overlong_buffer_cfg.log=False

``pkg://`` imports this module by name. A file path works too: verl then executes this file as an anonymous
module, which hands out this module's functions (see the end of the file), so a process still has one pool,
one cache and one set of counters. Counters are per process: under verl they live in the reward-loop Ray
actors, so the driver learns about failures through the ``reason``/``verify_failed`` values it receives.
"""

import hashlib
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eksft_pipeline.scoring import answer as _answer
from eksft_pipeline.scoring import normalize as _normalize
from eksft_pipeline.scoring.answer import (
    ERROR,
    GOLD_UNPARSEABLE,
    NO_ANSWER,
    OK,
    PRED_TOO_DEEP,
    PRED_TOO_LONG,
    TIMEOUT,
)
from eksft_pipeline.scoring.cache import _cache, clear_cache
from eksft_pipeline.scoring.policy import POLICIES, AnswerPolicy, get_policy, policy_for
from eksft_pipeline.scoring.pool import _get_pool, configure_pool, shutdown_pool, worker_pids
from eksft_pipeline.scoring.stats import (
    REASONS,
    _bump,
    _note_example,
    logger,
    record_batch,
    reset_reward_stats,
    reward_stats,
)

__all__ = ["REASONS", "RewardConfig", "clear_cache", "compute_score", "configure", "reset_reward_stats",
           "reward_stats", "score_batch", "shutdown_pool", "worker_pids"]

EXTRACTION_MODES = ("boxed", "math_verify", "plain")
_VERL_PASSTHROUGH_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})


@dataclass(frozen=True)
class RewardConfig:
    """Per-call scoring options (see module docstring)."""

    correct_score: float = 1.0
    wrong_score: float = -1.0
    extraction: str = "boxed"
    after_think: bool = True
    require_think_close: bool = False
    max_pred_chars: int = 1000
    max_brace_depth: int = 10
    max_tail_chars: int = 4000
    max_plain_chars: int = 100_000
    timeout_s: float = 5.0
    use_cache: bool = True
    policy: str = "auto"

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "RewardConfig":
        """Validated options; values are coerced to the field types (YAML/CLI may give "5" or 5 for 5.0)."""
        fields = cls.__dataclass_fields__
        unknown = sorted(set(kwargs) - set(fields) - _VERL_PASSTHROUGH_KWARGS)
        if unknown:
            raise TypeError(f"compute_score got unknown option(s) {unknown}; known: {sorted(fields)}")
        vals: dict[str, Any] = {}
        for k, v in kwargs.items():
            if k not in fields:
                continue
            default = fields[k].default
            if isinstance(default, bool):
                if not isinstance(v, bool):
                    raise TypeError(f"{k} must be True or False, got {v!r}")
            else:
                try:
                    v = type(default)(v)
                except (TypeError, ValueError):
                    raise TypeError(f"{k} must be {type(default).__name__}, got {v!r}") from None
            vals[k] = v
        cfg = cls(**vals)
        if cfg.extraction not in EXTRACTION_MODES:
            raise ValueError(f"extraction={cfg.extraction!r}; expected one of {EXTRACTION_MODES}")
        if not cfg.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {cfg.timeout_s!r}")
        if cfg.policy != "auto" and cfg.policy not in POLICIES:
            raise ValueError(f"policy={cfg.policy!r}; expected 'auto' or one of {sorted(POLICIES)}")
        for name in ("max_pred_chars", "max_brace_depth", "max_tail_chars", "max_plain_chars"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)!r}")
        return cfg


def configure(
    n_workers: int | None = None,
    startup_timeout_s: float | None = None,
    memory_limit_mb: int | None = None,
    cache_size: int | None = None,
) -> None:
    """Change pool/cache settings; a changed pool setting restarts the pool on next use."""
    configure_pool(n_workers, startup_timeout_s, memory_limit_mb)
    if cache_size is not None:
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size!r}")
        _cache.maxsize = int(cache_size)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _gold_tuple(ground_truth: Any) -> tuple[str, ...]:
    """Gold answers as a tuple of strings (verl stores one string; lists/arrays of alternatives allowed)."""
    if ground_truth is None:
        return ()
    if isinstance(ground_truth, str | bytes | bytearray):
        return (_answer.sanitize_text(ground_truth).strip(),)
    if hasattr(ground_truth, "tolist") and not isinstance(ground_truth, int | float):
        ground_truth = ground_truth.tolist()  # numpy scalar / array
    if isinstance(ground_truth, list | tuple):
        return tuple(g for x in ground_truth for g in _gold_tuple(x))
    return (_answer.sanitize_text(ground_truth).strip(),)


# An integer literal: optional minus, ASCII digits (\d would admit other scripts' digits), optional ".000".
_INT_LITERAL = re.compile(r"-?[0-9]{1,15}(?:\.0+)?")


def _int_fast_path(pred: str, gold: str) -> bool | None:
    """Verdict for an integer-literal prediction against an integer-literal gold, else None.

    math-verify parses both to sympy integers/floats and compares values, so "025" == "25" == "25.0"
    and "-0" == "0"; the same holds here by comparing the integer values. This covers most AIME/AMC
    pairs without a worker round trip (the tests check agreement with math-verify on generated literals).
    """
    if _INT_LITERAL.fullmatch(pred) is None or _INT_LITERAL.fullmatch(gold) is None:
        return None
    return int(pred.split(".")[0]) == int(gold.split(".")[0])


@dataclass(frozen=True)
class _Gold:
    """A gold tuple prepared under a policy (cached: a prompt's gold repeats for all its samples)."""

    golds: tuple[str, ...]  # normalised strings sent to the worker
    letter: str | None  # the choice letter when the gold is one ("\text{(C)}")
    error: str | None  # why the gold violates the policy (-> "gold_unparseable"), else None


_gold_memo: OrderedDict = OrderedDict()
_GOLD_MEMO_MAX = 50_000
_gold_memo_lock = threading.Lock()


def _prepare_gold(golds: tuple[str, ...], policy: AnswerPolicy) -> _Gold:
    key = (golds, policy)
    with _gold_memo_lock:
        hit = _gold_memo.get(key)
    if hit is not None:
        return hit
    letter = _normalize.choice_letter(golds[0]) if len(golds) == 1 else None
    error = None
    if policy.integer_range is not None:
        lo, hi = policy.integer_range
        vals = [_normalize.integer_value(g) for g in golds]
        if any(v is None or not lo <= v <= hi for v in vals):
            error = f"gold {golds!r:.80} is not an integer in [{lo}, {hi}] (answer policy {policy.name!r})"
    normed = tuple(_normalize.normalize_text(g, policy, is_gold=True) for g in golds)
    out = _Gold(normed, letter, error)
    with _gold_memo_lock:
        _gold_memo[key] = out
        while len(_gold_memo) > _GOLD_MEMO_MAX:
            _gold_memo.popitem(last=False)
    return out


def _extract(solution_str: Any, cfg: RewardConfig, gold: _Gold | None, policy: AnswerPolicy
             ) -> tuple[str | None, str, str]:
    """(payload for the worker or None, status, pred for the result dict) in the calling process."""
    text = _answer.sanitize_text(solution_str) if solution_str is not None else ""
    if cfg.extraction == "plain":  # verl's math_verify reward reads the whole completion
        if not text.strip():
            return None, NO_ANSWER, ""
        return text[-cfg.max_plain_chars :], OK, ""
    region = _answer.answer_region(text, after_think=cfg.after_think, require_think_close=cfg.require_think_close)
    if region is None:
        return None, NO_ANSWER, ""
    if cfg.extraction == "math_verify":
        tail = region[-cfg.max_tail_chars :]
        if not tail.strip():
            return None, NO_ANSWER, ""
        return tail, OK, ""
    boxes, status = _answer.final_boxes(region, max_chars=cfg.max_pred_chars)
    if boxes is None:
        return None, status, ""
    letter = gold.letter if gold is not None else None
    parts = []
    for content in boxes:
        p = _answer.normalize_answer(content)
        if not p:
            continue
        if _answer.brace_depth(p) > cfg.max_brace_depth:
            return None, PRED_TOO_DEEP, ""
        parts.append(_normalize.normalize_text(p, policy, gold_letter=letter))
    parts = [p for p in parts if p]
    if not parts:
        return None, NO_ANSWER, ""
    pred = ", ".join(dict.fromkeys(parts))  # several boxes of one answer: the list of their values
    if len(pred) > cfg.max_pred_chars:
        return None, PRED_TOO_LONG, ""
    if policy.ordered_tuples and gold is not None and len(gold.golds) == 1:
        pred = _normalize.order_like_gold(pred, gold.golds[0])
    return pred, OK, pred


# Reasons that say nothing about the model: the verifier or the data failed.
VERIFY_FAILED = frozenset({TIMEOUT, ERROR, GOLD_UNPARSEABLE})


def _result(cfg: RewardConfig, status: str, correct: bool, pred: str) -> dict[str, Any]:
    correct = bool(correct) and status == OK
    return {
        "score": float(cfg.correct_score if correct else cfg.wrong_score),
        "acc": 1.0 if correct else 0.0,
        "pred": pred,
        "reason": status,
        "verify_failed": 1.0 if status in VERIFY_FAILED else 0.0,
    }


def _as_item(item: Any) -> tuple[Any, Any, Any, Any]:
    """(data_source, solution_str, ground_truth, policy or None) of one score_batch item."""
    if isinstance(item, dict):
        try:
            return item.get("data_source"), item["solution_str"], item["ground_truth"], item.get("policy")
        except KeyError as e:
            raise KeyError(f"score_batch item dict lacks key {e}; needs solution_str and ground_truth") from None
    if isinstance(item, list | tuple) and len(item) == 3:
        return item[0], item[1], item[2], None
    raise TypeError(f"score_batch item must be (data_source, solution_str, ground_truth) or a dict, got {item!r:.80}")


def _resolve_policy(spec: Any, data_source: Any) -> AnswerPolicy:
    if spec is None or spec == "auto":
        return policy_for(data_source)
    return get_policy(spec)


def score_batch(items: Sequence[Any], **kwargs: Any) -> list[dict[str, Any]]:
    """Score many completions at once (see module docstring). Bad options raise; bad items never do,
    except an item dict whose ``policy`` names no policy (a config error, like an unknown option)."""
    cfg = RewardConfig.from_kwargs(kwargs)
    batch_policy = None if cfg.policy == "auto" else get_policy(cfg.policy)
    quads = [_as_item(it) for it in items]
    policies = [_resolve_policy(p, ds) if p is not None else (batch_policy or policy_for(ds)) for ds, _, _, p in quads]
    n = len(quads)
    verdicts: list[tuple[str, bool, str] | None] = [None] * n
    preds: list[str] = [""] * n
    todo: dict[tuple, tuple[str, tuple[str, ...], tuple, list[int]]] = {}  # key -> (payload, golds, opts, idx)
    gold_notes: dict[int, str] = {}  # item -> why its gold violates the policy
    hits = misses = dedup = n_fast = 0
    mode = cfg.extraction
    for i, (data_source, solution_str, ground_truth, _) in enumerate(quads):
        policy = policies[i]
        try:
            raw_golds = _gold_tuple(ground_truth)
            gold = _prepare_gold(raw_golds, policy) if any(raw_golds) and mode == "boxed" else None
            payload, status, pred = _extract(solution_str, cfg, gold, policy)
            preds[i] = pred
            if payload is None:
                verdicts[i] = (status, False, pred)
                continue
            if not any(raw_golds):
                verdicts[i] = (GOLD_UNPARSEABLE, False, pred)
                _note_example(
                    "gold_unparseable_examples",
                    repr(ground_truth)[:200],
                    f"reward: empty gold answer {ground_truth!r:.80} (data_source={data_source!r})",
                )
                continue
            if gold is not None and gold.error:
                verdicts[i] = (GOLD_UNPARSEABLE, False, pred)
                gold_notes[i] = gold.error
                continue
            golds = gold.golds if gold is not None else raw_golds
            if mode == "boxed" and len(golds) == 1:
                fast = _int_fast_path(payload, golds[0])
                if fast is not None:
                    verdicts[i] = (OK, fast, pred)
                    n_fast += 1
                    continue
            opts = policy.worker_options() if mode == "boxed" else ()
            ident = payload if mode != "plain" else hashlib.blake2b(payload.encode("utf-8", "replace")).digest()
            key = (mode, ident, golds, opts)
            hit = _cache.get(key) if cfg.use_cache else None
            if hit is not None:
                verdicts[i] = hit
                hits += 1
            elif key in todo:
                todo[key][3].append(i)
            else:
                todo[key] = (payload, golds, opts, [i])
        except Exception as e:  # extraction must never take the caller down
            verdicts[i] = (ERROR, False, f"{type(e).__name__}: {e}"[:200])
    if todo:
        misses, dedup = _verify_todo(todo, cfg, mode, verdicts)
    out, reasons, correct_n = _results(quads, verdicts, preds, gold_notes, cfg, mode)
    record_batch(reasons, items=n, correct=correct_n, cache_hits=hits, cache_misses=misses, dedup_hits=dedup,
                 int_fast_path=n_fast)
    return out


def _verify_todo(todo: dict, cfg: RewardConfig, mode: str, verdicts: list) -> tuple[int, int]:
    """Verify the de-duplicated payloads of `todo` in the worker pool, writing each result into `verdicts` for
    every item that shares it (and into the cache); returns (cache misses, items de-duplicated)."""
    # without the cache every sample is its own job (no de-duplication), which the benchmark measures
    jobs: list[tuple[str, tuple[str, ...], str, tuple]] = []
    owners: list[list[int]] = []
    keys: list[tuple] = []
    for k, (payload, golds, opts, idx) in todo.items():
        groups = [idx] if cfg.use_cache else [[i] for i in idx]
        for g in groups:
            jobs.append((payload, golds, mode, opts))
            owners.append(g)
            keys.append(k)
    misses = len(todo) if cfg.use_cache else 0
    dedup = (sum(len(g) for g in owners) - len(todo)) if cfg.use_cache else 0
    try:
        res = _get_pool().run(jobs, cfg.timeout_s)
    except Exception as e:
        logger.exception("reward: verifier pool failed")
        res = [(ERROR, False, f"pool: {type(e).__name__}: {e}"[:200])] * len(jobs)
    _bump("verify_calls", len(jobs))
    for job, k, g, r in zip(jobs, keys, owners, res):
        if r[0] == TIMEOUT:  # logged once per verification; cached repeats are only counted
            logger.warning("reward: verification timed out after %.1fs (pred=%r)", cfg.timeout_s, job[0][-80:])
        if cfg.use_cache and r[0] != ERROR:  # errors may be transient (worker crash): do not pin them
            _cache.put(k, r)
        for i in g:
            verdicts[i] = r
    return misses, dedup


def _results(quads: list, verdicts: list, preds: list[str], gold_notes: dict[int, str], cfg: RewardConfig,
             mode: str) -> tuple[list[dict[str, Any]], Counter, int]:
    """Each item's result dict (noting error / unparseable-gold examples), the reasons' counts, the number
    correct."""
    out: list[dict[str, Any]] = []
    correct_n = 0
    reasons: Counter = Counter()
    shows_display = mode in ("math_verify", "plain")
    for i, (data_source, _s, ground_truth, _) in enumerate(quads):
        status, correct, display = verdicts[i]
        pred = display if shows_display and status in (OK, _answer.PRED_UNPARSEABLE, GOLD_UNPARSEABLE) else preds[i]
        if status == ERROR:
            _note_example(
                "error_examples", display, f"reward: verifier error {display!r} (data_source={data_source!r})"
            )
        elif status == GOLD_UNPARSEABLE and i in gold_notes:
            _note_example("gold_unparseable_examples", gold_notes[i][:200],
                          f"reward: {gold_notes[i]} (data_source={data_source!r})")
        elif status == GOLD_UNPARSEABLE:
            _note_example(
                "gold_unparseable_examples",
                repr(ground_truth)[:200],
                f"reward: gold answer {ground_truth!r:.80} does not parse (data_source={data_source!r})",
            )
        out.append(_result(cfg, status, correct, pred if status != ERROR else preds[i]))
        reasons[status] += 1
        correct_n += out[i]["acc"] == 1.0
    return out, reasons, correct_n


def compute_score(
    data_source: Any,
    solution_str: Any,
    ground_truth: Any,
    extra_info: dict | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """verl custom reward: score one completion (see module docstring for keys, reasons and options)."""
    return score_batch([(data_source, solution_str, ground_truth)], **kwargs)[0]


# Loaded from its file path (verl: ``reward.custom_reward_function.path=/.../eksft_pipeline/scoring/reward.py``)
# this file runs as an anonymous module outside sys.modules. Its definitions above are inert (no pool is
# started until first use); hand out the package module's functions instead, so that a process has one
# worker pool, one cache and one set of counters however the reward was loaded.
if __name__ not in ("eksft_pipeline.scoring.reward", "__main__"):
    from eksft_pipeline.scoring import reward as _canonical

    compute_score = _canonical.compute_score  # noqa: F811
    score_batch = _canonical.score_batch  # noqa: F811
    reward_stats = _canonical.reward_stats  # noqa: F811
    reset_reward_stats = _canonical.reset_reward_stats  # noqa: F811
    configure = _canonical.configure  # noqa: F811
    clear_cache = _canonical.clear_cache  # noqa: F811
    shutdown_pool = _canonical.shutdown_pool  # noqa: F811
    worker_pids = _canonical.worker_pids  # noqa: F811
