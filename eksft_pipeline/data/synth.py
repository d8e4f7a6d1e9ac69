"""Synthetic arithmetic / algebra problems with worked R1-style traces, in the exact OpenR1-Math-46k-8192 schema.

This is the CPU default's training data (the real 46k set needs GPUs). Four families, each a ``data_source``:

* ``tiny_add``    (easy)   ``a + b``, each operand one or two digits (50/50); column addition with carries.
* ``tiny_sub``    (medium) ``a - b`` with ``10 <= a <= 99``, ``0 <= b <= a``; column subtraction with borrows.
* ``tiny_mul``    (medium) ``a * b`` with ``2 <= a <= 9``, ``2 <= b <= 99``; digit-by-digit with carries.
* ``tiny_linear`` (hard)   ``a x + b = c`` / ``a x - b = c`` with ``2 <= a <= 9``, ``1 <= b <= 30``,
  ``-9 <= x <= 20``; undo the constant, divide.

The default mix (SFT / RL data) and the eval benchmarks are ``tiny_add`` and ``tiny_sub``: a ~1M-parameter
model learns them within the CPU budget, so every stage visibly moves the numbers; ``tiny_mul`` and
``tiny_linear`` stay available through ``mix=``.

Every trace is deterministic given the problem and is a compact R1-style trace (short, so that a tiny model
sampling at temperature 1 can finish it correctly, and rollouts / evaluation stay cheap on CPU)::

    <think>\\n47 + 38: ones 7 + 8 = 15, tens 4 + 3 + 1 = 8.\\n</think>\\n\\nThe answer is \\boxed{85}.

The ground truth is ``str(ans)``. Problems are unique by text within one call, and the eval sets / pretraining corpus are
drawn from separate random streams with every train (and eval) text excluded, so they are disjoint.

Randomness is ``random.Random`` seeded with strings (``f"{seed}-train"`` ...), which Python hashes with
sha512, so the output is the same on every platform and Python 3 version: same seed -> byte-identical files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from eksft_pipeline.models.tokenizer import render_chatml

from .schema import OPENR1_SCHEMA, RL_SCHEMA, DataError

TINY_SYSTEM_PROMPT = "Think step by step, then give the final answer in \\boxed{}."

FAMILIES: tuple[str, ...] = ("tiny_add", "tiny_sub", "tiny_mul", "tiny_linear")
DIFFICULTY = {"tiny_add": "easy", "tiny_sub": "medium", "tiny_mul": "medium", "tiny_linear": "hard"}
DEFAULT_MIX: dict[str, float] = {"tiny_add": 0.5, "tiny_sub": 0.5}
DEFAULT_EVAL_SOURCES: tuple[str, ...] = ("tiny_add", "tiny_sub")

ANSWER_LINE = "The answer is \\boxed{{{ans}}}."
# The SFT traces' own habit: a fixed opening sentence the base model never writes (it is not in the pre-training
# corpus), as R1 traces open with phrases a base model does not produce. Ten tokens of about fifty in a trace:
# the "distribution-shifting tokens" of the paper, which EKSFT's KL criterion keeps out of imitation.
SFT_PREAMBLE = "Step by step: first the ones, then the tens."


def with_preamble(trace: str, preamble: str = SFT_PREAMBLE) -> str:
    """The trace with ``preamble`` as the first line of its ``<think>`` block."""
    if not trace.startswith("<think>\n"):
        raise ValueError("with_preamble: the trace must start with '<think>\\n'")
    return "<think>\n" + preamble + "\n" + trace[len("<think>\n"):]


def _wrap(question: str, steps: list[str], ans: int) -> str:
    """``<think>\\n<question>: <step>, <step>.\\n</think>\\n\\nThe answer is \\boxed{ans}.``"""
    return "<think>\n" + f"{question}: " + ", ".join(steps) + ".\n</think>\n\n" + ANSWER_LINE.format(ans=ans)


def add_trace(a: int, b: int) -> tuple[str, int]:
    """Column addition of non-negative ``a + b`` (operands < 100): ``ones x + y = s[, tens x + y [+ c] = t]``.

    The answer's digits are read off the steps: the tens result followed by the last digit of the ones result.
    """
    if not (0 <= a < 100 and 0 <= b < 100):
        raise ValueError(f"add_trace needs operands in [0, 100), got {a} + {b}")
    ans = a + b
    ones = a % 10 + b % 10
    steps = [f"ones {a % 10} + {b % 10} = {ones}"]
    carry = ones // 10
    if a >= 10 or b >= 10 or carry:
        steps.append(f"tens {a // 10} + {b // 10}" + (f" + {carry}" if carry else "") + f" = {a // 10 + b // 10 + carry}")
    return _wrap(f"{a} + {b}", steps, ans), ans


def sub_trace(a: int, b: int) -> tuple[str, int]:
    """Column subtraction ``a - b`` with ``99 >= a >= b >= 0`` and ``a >= 10``, borrowing from the tens."""
    if b > a:
        raise ValueError(f"sub_trace needs a >= b, got {a} - {b}")
    if not 10 <= a < 100:
        raise ValueError(f"sub_trace needs a two-digit a, got {a}")
    ans = a - b
    if a % 10 < b % 10:
        steps = [f"ones {a % 10 + 10} - {b % 10} = {a % 10 + 10 - b % 10}",
                 f"tens {a // 10} - 1 - {b // 10} = {a // 10 - 1 - b // 10}"]
    else:
        steps = [f"ones {a % 10} - {b % 10} = {a % 10 - b % 10}", f"tens {a // 10} - {b // 10} = {a // 10 - b // 10}"]
    return _wrap(f"{a} - {b}", steps, ans), ans


def mul_trace(a: int, b: int) -> tuple[str, int]:
    """Digit-by-digit ``a * b`` with a single-digit ``a`` and ``0 <= b < 100``."""
    if not 0 <= a <= 9:
        raise ValueError(f"mul_trace needs a single-digit a, got {a}")
    if not 0 <= b < 100:
        raise ValueError(f"mul_trace needs b in [0, 100), got {b}")
    ans = a * b
    ones = a * (b % 10)
    steps = [f"ones {a} * {b % 10} = {ones}"]
    if b >= 10:
        carry = ones // 10
        steps.append(f"tens {a} * {b // 10}" + (f" + {carry}" if carry else "") + f" = {a * (b // 10) + carry}")
    return _wrap(f"{a} * {b}", steps, ans), ans


def linear_trace(a: int, b: int, c: int) -> tuple[str, int]:
    """Solve ``a x + b = c`` (``b`` may be negative, ``b != 0``) with an integer solution."""
    if b == 0 or a == 0 or (c - b) % a:
        raise ValueError(f"linear_trace needs a != 0, b != 0 and an integer solution, got {a}x + {b} = {c}")
    x = (c - b) // a
    lhs = f"{a}x + {b}" if b > 0 else f"{a}x - {-b}"
    rhs = c - b
    undo = f"{a}x = {c} - {b} = {rhs}" if b > 0 else f"{a}x = {c} + {-b} = {rhs}"
    return _wrap(f"{lhs} = {c}", [undo, f"x = {rhs} / {a} = {x}"], x), x


def _sample(family: str, rng: random.Random) -> tuple[str, str, int]:
    """One random (problem text, trace, answer) of ``family``."""
    style = rng.randrange(3)
    if family == "tiny_add":
        a = rng.randrange(10) if rng.random() < 0.5 else rng.randrange(10, 100)
        b = rng.randrange(10) if rng.random() < 0.5 else rng.randrange(10, 100)
        q = (f"What is ${a} + {b}$?", f"Compute ${a} + {b}$.", f"Find the sum of {a} and {b}.")[style]
        trace, ans = add_trace(a, b)
    elif family == "tiny_sub":
        a = rng.randrange(10, 100)
        b = rng.randrange(0, a + 1)
        q = (f"What is ${a} - {b}$?", f"Compute ${a} - {b}$.", f"Subtract {b} from {a}.")[style]
        trace, ans = sub_trace(a, b)
    elif family == "tiny_mul":
        a, b = rng.randrange(2, 10), rng.randrange(2, 100)
        q = (f"What is ${a} \\times {b}$?", f"Compute ${a} \\times {b}$.", f"Find the product of {a} and {b}.")[style]
        trace, ans = mul_trace(a, b)
    elif family == "tiny_linear":
        a, x, b = rng.randrange(2, 10), rng.randrange(-9, 21), rng.randrange(1, 31)
        b = b if rng.random() < 0.5 else -b
        c = a * x + b
        lhs = f"{a}x + {b}" if b > 0 else f"{a}x - {-b}"
        q = (
            f"Solve for $x$: ${lhs} = {c}$.",
            f"Find $x$ if ${lhs} = {c}$.",
            f"What value of $x$ satisfies ${lhs} = {c}$?",
        )[style]
        trace, ans = linear_trace(a, b, c)
    else:
        raise DataError(f"unknown problem family {family!r} (expected one of {list(FAMILIES)})")
    return q, trace, ans


def _check_mix(mix: dict[str, float]) -> list[tuple[str, float]]:
    for fam, w in mix.items():
        if fam not in FAMILIES:
            raise DataError(f"unknown problem family {fam!r} in mix (expected one of {list(FAMILIES)})")
        if w < 0:
            raise DataError(f"negative weight {w} for family {fam!r}")
    total = sum(mix.values())
    if total <= 0:
        raise DataError("mix weights sum to zero")
    return [(f, w / total) for f, w in mix.items() if w > 0]


def generate_problems(
    n: int,
    *,
    seed: int | str = 0,
    mix: dict[str, float] | None = None,
    exclude: Iterable[str] = (),
    max_tries_factor: int = 50,
) -> list[dict[str, Any]]:
    """``n`` unique problems as ``{"data_source", "problem", "trace", "answer"}`` dicts.

    Family drawn with probabilities ``mix`` (normalised; default :data:`DEFAULT_MIX`), parameters uniform in the
    ranges of the module docstring. Texts in ``exclude`` and repeats are skipped; if ``n`` unique problems cannot
    be found in ``n * max_tries_factor`` draws, raises :class:`DataError` (the pool is too small for ``n``).
    """
    weights = _check_mix(mix or DEFAULT_MIX)
    rng = random.Random(str(seed))
    seen = set(exclude)
    out: list[dict[str, Any]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max(100, n * max_tries_factor):
            raise DataError(f"could only find {len(out)} unique problems of {n} requested with mix {dict(weights)}")
        r, fam = rng.random(), weights[-1][0]
        acc = 0.0
        for f, w in weights:
            acc += w
            if r < acc:
                fam = f
                break
        q, trace, ans = _sample(fam, rng)
        if q in seen:
            continue
        seen.add(q)
        out.append({"data_source": fam, "problem": q, "trace": trace, "answer": str(ans)})
    return out


def to_openr1_rows(problems: list[dict[str, Any]], *, system_prompt: str = TINY_SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """Problems -> rows in the exact OpenR1-Math-46k-8192 schema (extra_info index = position)."""
    return [
        {
            "data_source": p["data_source"],
            "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": p["problem"]}],
            "target": [{"role": "assistant", "content": p["trace"]}],
            "ability": "math",
            "reward_model": {"ground_truth": p["answer"], "style": "rule"},
            "extra_info": {"index": i, "split": "default"},
        }
        for i, p in enumerate(problems)
    ]


def to_rl_eval_rows(problems: list[dict[str, Any]], *, system_prompt: str = TINY_SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """Problems -> rows in verl's RL parquet layout (like the shared luffy_valid_all.parquet)."""
    return [
        {
            "data_source": p["data_source"],
            "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": p["problem"]}],
            "ability": "math",
            "reward_model": {"ground_truth": p["answer"], "style": "rule"},
            "extra_info": {"index": i, "split": "test"},
        }
        for i, p in enumerate(problems)
    ]


def write_parquet(rows: list[dict[str, Any]], path: str | Path, schema: pa.Schema) -> Path:
    """Write rows with an explicit schema (no pandas metadata) so equal rows give byte-identical files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def make_tiny_data(
    out_dir: str | Path,
    *,
    n_problems: int = 2400,
    n_eval_per_source: int = 32,
    eval_sources: Iterable[str] = DEFAULT_EVAL_SOURCES,
    n_pretrain: int = 4000,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    system_prompt: str = TINY_SYSTEM_PROMPT,
    pretrain_chat_frac: float = 0.5,
    pretrain_chat_trace_frac: float = 0.2,
    sft_preamble: str | None = SFT_PREAMBLE,
    pretrain_preamble_frac: float = 0.0,
) -> dict[str, Path]:
    """Write the tiny train / eval / pretraining data and return their paths.

    Files (in ``out_dir``):
        ``tiny_math_train.parquet``  ``n_problems`` rows, OpenR1 schema (input of the split stage).
        ``tiny_math_eval.parquet``   ``n_eval_per_source`` rows per ``eval_sources`` family, verl RL layout,
                                     disjoint from train.
        ``tiny_pretrain.jsonl``      ``n_pretrain`` ``{"text": ...}`` lines, disjoint from train and eval:
                                     a ``pretrain_chat_frac`` share rendered as ChatML conversations ending in
                                     ``<|im_end|>`` (real base models such as Qwen3-Base have seen ChatML, so they
                                     know the turn format and its end token), the rest plain
                                     ``"Problem: <q>\\n\\n<trace>"`` text. Of the conversations, only a
                                     ``pretrain_chat_trace_frac`` share answers with the worked trace and
                                     ``\\boxed{}``; the others answer tersely (``The answer is 85.``, see
                                     :func:`pretrain_text`). So the base model knows the arithmetic (from the
                                     traces) but in a chat usually answers without reasoning or a box, and SFT's
                                     job is what it is for real base models: to make the reasoning format the
                                     default (the paper's "activate task-relevant capabilities").
    The training problems' traces (the SFT data) open with ``sft_preamble`` (None: none), a sentence no chat
    document of the pre-training corpus has (see :data:`SFT_PREAMBLE`). A ``pretrain_preamble_frac`` share of the
    plain ``Problem:`` documents opens its trace with it too: at 0 the sentence's tokens are never trained before
    SFT (new vocabulary, which plain SFT at the tiny learning rate cannot learn without wrecking the arithmetic);
    above 0 the base model knows the sentence and how to go on after it but does not use it in a chat, so the
    sentence is unlikely where SFT puts it -- distribution-shifting, not unknown.
    """
    out = Path(out_dir)
    eval_sources = tuple(eval_sources)
    train = generate_problems(n_problems, seed=f"{seed}-train", mix=mix)
    if sft_preamble:
        train = [dict(p, trace=with_preamble(p["trace"], sft_preamble)) for p in train]
    seen = {p["problem"] for p in train}
    evals: list[dict[str, Any]] = []
    for src in eval_sources:
        got = generate_problems(n_eval_per_source, seed=f"{seed}-eval-{src}", mix={src: 1.0}, exclude=seen)
        seen.update(p["problem"] for p in got)
        evals.extend(got)
    pre = generate_problems(n_pretrain, seed=f"{seed}-pretrain", mix=mix, exclude=seen)
    paths = {
        "train": write_parquet(
            to_openr1_rows(train, system_prompt=system_prompt), out / "tiny_math_train.parquet", OPENR1_SCHEMA
        ),
        "eval": write_parquet(
            to_rl_eval_rows(evals, system_prompt=system_prompt), out / "tiny_math_eval.parquet", RL_SCHEMA
        ),
        "pretrain": write_jsonl(
            [{"text": pretrain_text(p if chat else _opened(p, j, sft_preamble, pretrain_preamble_frac), chat=chat,
                                    trace=not chat or _is_chat(j, pretrain_chat_trace_frac),
                                    system_prompt=system_prompt)}
             for p, chat, j in _chat_plan(pre, pretrain_chat_frac)],
            out / "tiny_pretrain.jsonl",
        ),
    }
    return paths


def _opened(problem: dict[str, Any], j: int, preamble: str | None, frac: float) -> dict[str, Any]:
    """Plain document ``j``'s problem, its trace opened with ``preamble`` when ``j`` falls in the ``frac`` share."""
    return dict(problem, trace=with_preamble(problem["trace"], preamble)) if preamble and _is_chat(j, frac) else problem


def _is_chat(i: int, frac: float) -> bool:
    # deterministic interleaving: document i is chat-formatted when floor((i+1)*frac) > floor(i*frac)
    return int((i + 1) * frac) > int(i * frac)


def _chat_plan(problems: list[dict[str, Any]], frac: float):
    """(problem, is_chat, index among the documents of its kind, chat or plain) for every pretraining document."""
    seen = [0, 0]  # plain, chat
    for i, p in enumerate(problems):
        chat = _is_chat(i, frac)
        yield p, chat, seen[chat]
        seen[chat] += 1


def pretrain_text(problem: dict[str, Any], *, chat: bool = False, trace: bool = True,
                  system_prompt: str = TINY_SYSTEM_PROMPT) -> str:
    """Rendering used for the base-model pretraining corpus: plain ``Problem: <q>\\n\\n<trace>`` text, or a
    ChatML conversation whose assistant turn is the trace (``trace=True``) or the terse ``The answer is <ans>.``"""
    if not chat:
        return f"Problem: {problem['problem']}\n\n{problem['trace']}"
    answer = problem["trace"] if trace else f"The answer is {problem['answer']}."
    return render_chatml(
        [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": problem["problem"]},
            {"role": "assistant", "content": answer},
        ]
    )
