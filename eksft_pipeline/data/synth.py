"""Synthetic arithmetic / algebra problems with worked R1-style traces, in the exact OpenR1-Math-46k-8192 schema.

This is the CPU default's training data (the real 46k set needs GPUs). Four families, each a ``data_source``:

* ``tiny_add``    (easy)   ``a + b``, each operand one or two digits (50/50); column addition with carries.
* ``tiny_sub``    (medium) ``a - b`` with ``10 <= a <= 99``, ``0 <= b <= a``; column subtraction with borrows.
* ``tiny_mul``    (medium) ``a * b`` with ``2 <= a <= 9``, ``2 <= b <= 99``; digit-by-digit with carries.
* ``tiny_linear`` (hard)   ``a x + b = c`` / ``a x - b = c`` with ``2 <= a <= 9``, ``1 <= b <= 30``,
  ``-9 <= x <= 20``; undo the constant, divide, check.

Every trace is deterministic given the problem and looks like an R1 trace:
``<think>\\n...steps...\\n</think>\\n\\n...solution... The answer is \\boxed{ans}.`` The ground truth is
``str(ans)``. Problems are unique by text within one call, and the eval sets / pretraining corpus are
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

from .schema import OPENR1_SCHEMA, RL_SCHEMA, DataError

TINY_SYSTEM_PROMPT = "Think step by step, then give the final answer in \\boxed{}."

FAMILIES: tuple[str, ...] = ("tiny_add", "tiny_sub", "tiny_mul", "tiny_linear")
DIFFICULTY = {"tiny_add": "easy", "tiny_sub": "medium", "tiny_mul": "medium", "tiny_linear": "hard"}
DEFAULT_MIX: dict[str, float] = {"tiny_add": 0.5, "tiny_sub": 0.2, "tiny_mul": 0.1, "tiny_linear": 0.2}
DEFAULT_EVAL_SOURCES: tuple[str, ...] = ("tiny_add", "tiny_linear")

_PLACES = ("Ones", "Tens", "Hundreds", "Thousands")


def _digits(n: int) -> list[int]:
    """Little-endian decimal digits of a non-negative int (``0 -> [0]``)."""
    return [int(c) for c in reversed(str(n))]


def _wrap(think: list[str], solution: str) -> str:
    return "<think>\n" + "\n".join(think) + "\n</think>\n\n" + solution


def add_trace(a: int, b: int) -> tuple[str, int]:
    """Column addition trace for non-negative ``a + b``."""
    ans = a + b
    lines = [f"I need to add {a} and {b}."]
    if a < 10 and b < 10:
        lines.append(f"{a} + {b} = {ans}.")
    else:
        da, db = _digits(a), _digits(b)
        carry = 0
        n = max(len(da), len(db))
        for k in range(n):
            x, y = (da[k] if k < len(da) else 0), (db[k] if k < len(db) else 0)
            s = x + y + carry
            expr = f"{x} + {y}" + (f" + {carry}" if carry else "")
            if k == n - 1:
                lines.append(f"{_PLACES[k]}: {expr} = {s}.")
                carry = 0
            else:
                carry_txt = f", carry {s // 10}" if s >= 10 else ""
                lines.append(f"{_PLACES[k]}: {expr} = {s}. Write {s % 10}{carry_txt}.")
                carry = s // 10
        lines.append(f"So {a} + {b} = {ans}.")
    return _wrap(lines, f"So ${a} + {b} = {ans}$. The answer is \\boxed{{{ans}}}."), ans


def sub_trace(a: int, b: int) -> tuple[str, int]:
    """Column subtraction trace for ``a - b`` with ``a >= b >= 0``."""
    if b > a:
        raise ValueError(f"sub_trace needs a >= b, got {a} - {b}")
    ans = a - b
    lines = [f"I need to subtract {b} from {a}."]
    da, db = _digits(a), _digits(b)
    borrow = 0
    for k in range(len(da)):
        x, y = da[k] - borrow, (db[k] if k < len(db) else 0)
        x_txt = f"{da[k]} - {borrow}" if borrow else f"{da[k]}"
        if x < y:
            lines.append(f"{_PLACES[k]}: {x_txt} is less than {y}, so borrow: {x + 10} - {y} = {x + 10 - y}.")
            borrow = 1
        else:
            lines.append(f"{_PLACES[k]}: {x_txt} - {y} = {x - y}.")
            borrow = 0
    lines.append(f"So {a} - {b} = {ans}.")
    lines.append(f"Check: {ans} + {b} = {a}.")
    return _wrap(lines, f"So ${a} - {b} = {ans}$. The answer is \\boxed{{{ans}}}."), ans


def mul_trace(a: int, b: int) -> tuple[str, int]:
    """Digit-by-digit trace for ``a * b`` with a single-digit ``a`` and non-negative ``b``."""
    if not 0 <= a <= 9:
        raise ValueError(f"mul_trace needs a single-digit a, got {a}")
    ans = a * b
    lines = [f"I need to multiply {b} by {a}."]
    db = _digits(b)
    carry = 0
    for k, d in enumerate(db):
        p = a * d + carry
        expr = f"{a} * {d}" + (f" + {carry}" if carry else "")
        if k == len(db) - 1:
            lines.append(f"{_PLACES[k]}: {expr} = {p}.")
        else:
            carry_txt = f", carry {p // 10}" if p >= 10 else ""
            lines.append(f"{_PLACES[k]}: {expr} = {p}. Write {p % 10}{carry_txt}.")
            carry = p // 10
    lines.append(f"So {a} * {b} = {ans}.")
    return _wrap(lines, f"So ${a} \\times {b} = {ans}$. The answer is \\boxed{{{ans}}}."), ans


def linear_trace(a: int, b: int, c: int) -> tuple[str, int]:
    """Trace solving ``a x + b = c`` (``b`` may be negative, ``b != 0``) with an integer solution."""
    if b == 0 or a == 0 or (c - b) % a:
        raise ValueError(f"linear_trace needs a != 0, b != 0 and an integer solution, got {a}x + {b} = {c}")
    x = (c - b) // a
    lhs = f"{a}x + {b}" if b > 0 else f"{a}x - {-b}"
    rhs = c - b
    if b > 0:
        step = f"Subtract {b} from both sides: {a}x = {c} - {b} = {rhs}."
    else:
        step = f"Add {-b} to both sides: {a}x = {c} + {-b} = {rhs}."
    check_term = a * x
    check = f"Check: {a} * {x} {'+' if b > 0 else '-'} {abs(b)} = {check_term} {'+' if b > 0 else '-'} {abs(b)} = {c}."
    lines = [f"I need to solve {lhs} = {c}.", step, f"Divide both sides by {a}: x = {rhs} / {a} = {x}.", check]
    return _wrap(lines, f"So $x = {x}$. The answer is \\boxed{{{x}}}."), x


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
                                     ``"Problem: <q>\\n\\n<trace>"`` text.
    """
    out = Path(out_dir)
    eval_sources = tuple(eval_sources)
    train = generate_problems(n_problems, seed=f"{seed}-train", mix=mix)
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
            [{"text": pretrain_text(p, chat=_is_chat(i, pretrain_chat_frac), system_prompt=system_prompt)}
             for i, p in enumerate(pre)],
            out / "tiny_pretrain.jsonl",
        ),
    }
    return paths


def _is_chat(i: int, frac: float) -> bool:
    # deterministic interleaving: document i is chat-formatted when floor((i+1)*frac) > floor(i*frac)
    return int((i + 1) * frac) > int(i * frac)


def pretrain_text(problem: dict[str, Any], *, chat: bool = False, system_prompt: str = TINY_SYSTEM_PROMPT) -> str:
    """Rendering used for the base-model pretraining corpus: plain text, or a ChatML conversation."""
    if not chat:
        return f"Problem: {problem['problem']}\n\n{problem['trace']}"
    from eksft_pipeline.models.tiny import render_chatml  # lazy: models.tiny imports this module

    return render_chatml(
        [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": problem["problem"]},
            {"role": "assistant", "content": problem["trace"]},
        ]
    )
