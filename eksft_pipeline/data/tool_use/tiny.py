"""The CPU twin of the tool-use experiment: generated tools and requests the tiny model can learn.

:func:`make_tiny_tool_data` writes two folders, both in the layouts of the real data, so the real code paths
run on them unchanged:

* ``acebench/data_en/`` -- the training set in ACEBench's layout (read by :mod:`.acebench`):
  ``normal_single_turn_single_function`` (one request, one call; the row's tools are the right one plus 0-2
  distractors), ``normal_single_turn_parallel_function`` (two requests in one message, two calls) and
  ``special_irrelevant`` (a request no tool serves; target: the refusal). ``irrelevant_frac`` of the rows
  are irrelevant.
* ``bfcl/`` -- the held-out eval set in BFCL v4's layout (read by :mod:`eksft_pipeline.eval.bfcl`, scored by
  BFCL's own checker): ``BFCL_v4_live_simple.json`` (one tool), ``..._live_multiple.json`` (2-3 tools),
  ``..._live_parallel.json`` (one tool, two calls), ``..._live_parallel_multiple.json`` (two tools, one call
  each), ``..._irrelevance.json`` and ``..._live_irrelevance.json``
  (requests no tool serves), with ``possible_answer/`` files as BFCL writes them (``{name: {arg: [value]}}``).

Requests and operands of the eval set are drawn from a separate stream (``seed`` + 1), cities from a list
disjoint from training's, and any (template, arguments) pair that occurs in training is redrawn, so eval
requests are never training requests. Tool schemas
are short (two arguments at most) so that a request with its tool docs fits the tiny model's context.
Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TOOLS: dict[str, dict[str, Any]] = {
    "add": {"name": "add", "description": "Add two integers.",
            "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "required": ["a", "b"]}},
    "sub": {"name": "sub", "description": "Subtract b from a.",
            "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "required": ["a", "b"]}},
    "weather": {"name": "weather", "description": "Weather of a city.",
                "parameters": {"type": "dict", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    "timer": {"name": "timer", "description": "Start a timer.",
              "parameters": {"type": "dict", "properties": {"minutes": {"type": "integer"}},
                             "required": ["minutes"]}},
}  # fmt: skip
# training and eval draw cities from disjoint lists (there are too few (template, city) pairs to hold some out)
CITIES = {"train": ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Dakar", "Quito", "Perth", "Riga"),
          "eval": ("Bern", "Kyiv", "Doha", "Baku", "Accra", "Hanoi", "Sofia", "Tunis", "Minsk", "Dhaka")}
REQUESTS = {
    "add": ("What is {a} plus {b}?", "Add {a} and {b}."),
    "sub": ("What is {a} minus {b}?", "Subtract {b} from {a}."),
    "weather": ("Weather in {city}?", "How is the weather in {city}?"),
    "timer": ("Set a timer for {minutes} minutes.", "Start a {minutes} minute timer."),
}
IRRELEVANT = ("Tell me a joke.", "Who wrote Hamlet?", "Translate hello to French.", "Sing me a song.",
              "What is your name?", "Recommend a book.", "Write a poem about rain.", "How tall is Everest?")  # fmt: skip
REFUSAL = "Due to the limitations of the function, I cannot solve this problem."  # = acebench SPECIAL_TARGETS


def _args(rng: random.Random, name: str, split: str) -> dict[str, Any]:
    if name in ("add", "sub"):
        return {"a": rng.randint(10, 99), "b": rng.randint(10, 99)}
    if name == "weather":
        return {"city": rng.choice(CITIES[split])}
    return {"minutes": rng.randint(2, 240)}


def _request(rng: random.Random, name: str, args: dict[str, Any]) -> tuple[str, str]:
    tmpl = rng.choice(REQUESTS[name])
    return tmpl, tmpl.format(**args)


def _tools(rng: random.Random, needed: list[str], n_extra: int) -> list[dict[str, Any]]:
    others = [t for t in TOOLS if t not in needed]
    names = list(dict.fromkeys(needed)) + rng.sample(others, min(n_extra, len(others)))
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


class _Stream:
    """Requests drawn without repeating a (template, arguments) pair of ``banned``."""

    def __init__(self, seed: int, split: str, banned: set | None = None):
        self.rng = random.Random(seed)
        self.split = split
        self.banned = banned if banned is not None else set()
        self.seen: set = set()

    def call(self, name: str | None = None) -> tuple[str, dict[str, Any], str]:
        for _ in range(1000):
            n = name or self.rng.choice(list(TOOLS))
            args = _args(self.rng, n, self.split)
            tmpl, text = _request(self.rng, n, args)
            key = (tmpl, json.dumps(args, sort_keys=True))
            if key not in self.banned:
                self.seen.add(key)
                return n, args, text
        raise RuntimeError("tiny tool data: ran out of fresh requests")


def _dump(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_tiny_tool_data(out_dir: str | Path, *, n_train: int = 320, n_eval_per_category: int = 32,
                        irrelevant_frac: float = 0.15, parallel_frac: float = 0.15, seed: int = 0) -> dict[str, str]:
    """Write the twin's training folder (ACEBench layout) and eval folder (BFCL layout); returns their paths."""
    if not 0 <= irrelevant_frac < 1 or not 0 <= parallel_frac < 1 or irrelevant_frac + parallel_frac >= 1:
        raise ValueError(f"irrelevant_frac={irrelevant_frac}, parallel_frac={parallel_frac}: each in [0, 1), sum < 1")
    if n_train < 1 or n_eval_per_category < 1:
        raise ValueError(f"n_train={n_train}, n_eval_per_category={n_eval_per_category} must be >= 1")
    out = Path(out_dir)
    train = _Stream(seed, "train")
    single, parallel, irrelevant = [], [], []
    n_irr = round(n_train * irrelevant_frac)
    n_par = round(n_train * parallel_frac)
    for i in range(n_train - n_irr - n_par):
        name, args, text = train.call()
        single.append(({"id": f"normal_single_turn_single_function_{i}", "question": f"user: {text}\n",
                        "function": _tools(train.rng, [name], train.rng.randint(0, 2)), "time": ""},
                       {name: args}))  # fmt: skip
    for i in range(n_par):
        (n1, a1, t1), (n2, a2, t2) = train.call(), train.call()
        gold = {f"{n1}_1": a1, f"{n2}_2": a2} if n1 == n2 else {n1: a1, n2: a2}
        parallel.append(({"id": f"normal_single_turn_parallel_function_{i}", "question": f"user: {t1} And {t2}\n",
                          "function": _tools(train.rng, [n1, n2], train.rng.randint(0, 1)), "time": ""}, gold))
    for i in range(n_irr):
        irrelevant.append(({"id": f"special_irrelevant_{i}", "question": f"user: {train.rng.choice(IRRELEVANT)}\n",
                            "function": _tools(train.rng, [], train.rng.randint(1, 2)), "time": ""}, REFUSAL))
    ace = out / "acebench" / "data_en"
    for cat, rows in (("normal_single_turn_single_function", single),
                      ("normal_single_turn_parallel_function", parallel), ("special_irrelevant", irrelevant)):
        _dump(ace / f"data_{cat}.json", [q for q, _ in rows])
        _dump(ace / "possible_answer" / f"data_{cat}.json", [{"id": q["id"], "ground_truth": g} for q, g in rows])

    ev = _Stream(seed + 1, "eval", banned=train.seen)
    bfcl = out / "bfcl"
    cats: dict[str, list[tuple[dict, Any]]] = {c: [] for c in ("live_simple", "live_multiple", "live_parallel",
                                                                "live_parallel_multiple", "irrelevance",
                                                                "live_irrelevance")}  # fmt: skip
    for _ in range(n_eval_per_category):
        name, args, text = ev.call()
        cats["live_simple"].append(({"question": [[{"role": "user", "content": text}]], "function": [TOOLS[name]]},
                                    [{name: {k: [v] for k, v in args.items()}}]))
        name, args, text = ev.call()
        cats["live_multiple"].append(({"question": [[{"role": "user", "content": text}]],
                                       "function": _tools(ev.rng, [name], ev.rng.randint(1, 2))},
                                      [{name: {k: [v] for k, v in args.items()}}]))
        name = ev.rng.choice(list(TOOLS))
        (n1, a1, t1), (n2, a2, t2) = ev.call(name), ev.call(name)
        cats["live_parallel"].append(({"question": [[{"role": "user", "content": f"{t1} And {t2}"}]],
                                       "function": [TOOLS[name]]},
                                      [{n1: {k: [v] for k, v in a1.items()}}, {n2: {k: [v] for k, v in a2.items()}}]))
        n1, n2 = ev.rng.sample(list(TOOLS), 2)
        (n1, a1, t1), (n2, a2, t2) = ev.call(n1), ev.call(n2)
        cats["live_parallel_multiple"].append(({"question": [[{"role": "user", "content": f"{t1} And {t2}"}]],
                                                "function": _tools(ev.rng, [n1, n2], ev.rng.randint(0, 1))},
                                               [{n1: {k: [v] for k, v in a1.items()}},
                                                {n2: {k: [v] for k, v in a2.items()}}]))  # fmt: skip
        for c in ("irrelevance", "live_irrelevance"):
            cats[c].append(({"question": [[{"role": "user", "content": ev.rng.choice(IRRELEVANT)}]],
                             "function": _tools(ev.rng, [], ev.rng.randint(1, 2))}, None))
    for cat, rows in cats.items():
        ids = [f"{cat}_{i}" for i in range(len(rows))]
        _dump(bfcl / f"BFCL_v4_{cat}.json", [{"id": i, **q} for i, (q, _) in zip(ids, rows)])
        if rows[0][1] is not None:
            _dump(bfcl / "possible_answer" / f"BFCL_v4_{cat}.json",
                  [{"id": i, "ground_truth": g} for i, (_, g) in zip(ids, rows)])
    (bfcl / "possible_answer").mkdir(parents=True, exist_ok=True)
    return {"acebench": str(out / "acebench"), "bfcl": str(bfcl)}


__all__ = ["TOOLS", "make_tiny_tool_data"]
