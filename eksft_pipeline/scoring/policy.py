"""Answer policies: how the math reward decides the debatable cases, per benchmark.

A policy is a small frozen dataclass; the reward picks one per sample (``policy="auto"``: from the sample's
``data_source``, see :func:`policy_for`), or the caller names one (``score_batch(..., policy="aime")``, or a
``"policy"`` key in an item dict; the eval stage passes each benchmark's ``policy`` from
``recipes/benchmarks/*.yaml``). The decisions and their reasons:

``choice_letters`` (``"value"`` | ``"strict"``; every built-in policy: ``"value"``)
    ``\\textbf{(C) } 27``, ``(C)\\ 27``, ``27 \\text{ (C)}``: models trained on AMC-style data label their
    answer with the choice letter. ``"value"`` drops the label and judges the value (a gold that is itself a
    letter, MATH's ``\\text{(C)}``, is compared with the label instead). A bare letter against a numeric gold
    stays wrong: the choices are not part of the gold. ``"strict"`` leaves the label in (plain math-verify
    reads ``(C) 27`` as ``c*27``: wrong).
``integer_range`` (``aime``: ``(0, 999)``; others ``None``)
    AIME answers are integers 0-999. Under this policy a gold that is not such an integer (after dropping
    leading zeros, ``.0`` and a degree sign: ``025``, ``336^\\circ``) scores "gold_unparseable" and is named
    in the counters (a benchmark mapped to the wrong file shows up at once). Predictions are judged by value
    as under every policy (``\\frac{408}{2}`` is 204), and a decimal must equal the integer exactly.
``percent`` (``"unit"`` | ``"fraction"``; every built-in policy: ``"unit"``)
    ``"unit"``: a percent sign is a unit, dropped from prediction and gold alike: ``5\\%`` is right for gold
    ``5`` and for gold ``5\\%``, wrong for gold ``0.05``. Reason: MATH/AMC "what percent ..." golds store the
    number without the sign, and a model that adds the sign to a count is not a failure seen in practice.
    ``"fraction"`` reads ``x\\%`` as ``x/100`` on both sides (``5\\%`` = ``0.05`` != ``5``).
``min_significant_digits`` (every built-in policy: 6)
    A decimal prediction (``0.3333333``, ``1.414214``, ``1.7361\\times10^{-3}``) against a gold with a
    non-terminating expansion (``\\frac{1}{3}``, ``\\sqrt{2}``, ``\\frac{1}{576}``) is right when it has at
    least this many significant digits and is within one unit of its last written digit of the gold
    (rounded or truncated). Plain math-verify instead rounds both sides to 6 decimal *places*, which accepts
    ``0.001736`` (4 significant digits) for ``\\frac{1}{576}`` and rejects ``10.81665`` (7 significant
    digits) for ``3\\sqrt{13}``. A gold that is an integer or a terminating decimal (``\\frac{1}{8}``,
    ``0.15``) needs the exact value (``0.125``, ``0.150``), as there is nothing to round.
``angles`` (``"as_written"`` | ``"convert"``; every built-in policy: ``"as_written"``)
    ``"as_written"``: the answer must be in the gold's unit: for ``90^\\circ`` the answers ``90``,
    ``90^\\circ``, ``90°``, ``90\\text{ degrees}`` are right and ``\\frac{\\pi}{2}`` is wrong; for
    ``\\frac{\\pi}{6}`` the answer ``30^\\circ`` is wrong (MATH/AIME questions state the unit they want).
    ``"convert"`` also accepts the other unit (``x^\\circ`` = ``x\\pi/180``).
``ordered_tuples`` (every built-in policy: ``True``)
    A bare list ``3, \\frac{\\pi}{2}`` against a parenthesised gold ``(3, \\frac{\\pi}{2})`` is read in order
    as the tuple. Plain math-verify compares a bare list as a *set*, so it accepts ``-1, 31, 6`` for the
    ordered triple ``(6, 31, -1)``.

Not a policy choice (always on): thin-space / spaced thousands separators (``3\\,375``), several boxes of one
final answer read as one multi-value answer, ``\\pm`` expanded into its two values, repeating decimals
(``0.\\overline{4}`` = 4/9), inequalities compared with intervals (``x \\le 3`` = ``(-\\infty, 3]``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

CHOICE_LETTERS = ("value", "strict")
PERCENT = ("unit", "fraction")
ANGLES = ("as_written", "convert")


@dataclass(frozen=True)
class AnswerPolicy:
    """How to judge the debatable cases (see the module docstring for each field's reasons)."""

    name: str = "math"
    choice_letters: str = "value"
    integer_range: tuple[int, int] | None = None
    percent: str = "unit"
    min_significant_digits: int = 6
    angles: str = "as_written"
    ordered_tuples: bool = True

    def __post_init__(self) -> None:
        for field_name, allowed in (("choice_letters", CHOICE_LETTERS), ("percent", PERCENT), ("angles", ANGLES)):
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"answer policy {self.name!r}: {field_name}={getattr(self, field_name)!r}; "
                                 f"expected one of {allowed}")
        if self.integer_range is not None:
            lo, hi = self.integer_range
            if int(lo) > int(hi):
                raise ValueError(f"answer policy {self.name!r}: integer_range {self.integer_range} is empty")
            object.__setattr__(self, "integer_range", (int(lo), int(hi)))
        if int(self.min_significant_digits) < 1:
            raise ValueError(f"answer policy {self.name!r}: min_significant_digits must be >= 1")

    def worker_options(self) -> tuple[int, str]:
        """The part of the policy the verifier worker needs (plain values: the worker imports nothing)."""
        return (int(self.min_significant_digits), self.angles)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["integer_range"] = list(self.integer_range) if self.integer_range else None
        return d


MATH = AnswerPolicy(name="math")
AIME = AnswerPolicy(name="aime", integer_range=(0, 999))
AMC = AnswerPolicy(name="amc")

POLICIES: dict[str, AnswerPolicy] = {p.name: p for p in (MATH, AIME, AMC)}

# data_source values (lower-cased) that select a policy under policy="auto"; anything else gets "math".
_AIME_SOURCE = re.compile(r"aime(?:[_-]?(?:\d{2}|\d{4}))?(?:[_-]?(?:i|ii|1|2))?")
_AMC_SOURCE = re.compile(r"amc(?:[_-]?\d{1,4}[ab]?)?")


def policy_for(data_source: Any) -> AnswerPolicy:
    """The policy ``policy="auto"`` uses for a sample: ``aime``, ``aime24``, ``aime_2025`` -> AIME;
    ``amc``, ``amc23``, ``amc12b`` -> AMC; anything else (MATH-500, HMMT, OpenR1 sources) -> MATH."""
    ds = str(data_source or "").strip().lower()
    if _AIME_SOURCE.fullmatch(ds):
        return AIME
    if _AMC_SOURCE.fullmatch(ds):
        return AMC
    return MATH


def get_policy(spec: Any) -> AnswerPolicy:
    """A policy from a name (``"aime"``), a dict of fields (``{"name": "hmmt", "percent": "fraction"}``,
    unset fields from MATH, or from ``base: aime``), or an :class:`AnswerPolicy`. Unknown names/fields raise."""
    if isinstance(spec, AnswerPolicy):
        return spec
    if isinstance(spec, str):
        if spec not in POLICIES:
            raise ValueError(f"unknown answer policy {spec!r}; known: {sorted(POLICIES)} (or a dict of fields)")
        return POLICIES[spec]
    if isinstance(spec, dict):
        spec = dict(spec)
        base = get_policy(spec.pop("base", "math"))
        known = {f.name for f in fields(AnswerPolicy)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"answer policy: unknown field(s) {unknown}; allowed: {sorted(known | {'base'})}")
        if "integer_range" in spec and spec["integer_range"] is not None:
            spec["integer_range"] = tuple(spec["integer_range"])
        spec.setdefault("name", f"{base.name}+custom")
        return replace(base, **spec)
    raise TypeError(f"answer policy must be a name, a dict or an AnswerPolicy, got {type(spec).__name__}")
