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

The tools span three kinds of argument (``KINDS``), because what the tiny model can learn differs by kind
(measured with ``scripts/probe_tool_twin.py``: README "Tool use", the CPU twin):

* ``copy`` (``add``: two integers; ``weather``: a city) -- the values must be copied from the request. Eval
  cities come from a list disjoint from training's. With the tool schemas in the system turn the 0.9M model
  does not learn this copy (it answers with memorised training values), so these entries stay near 0.
* ``closed`` (``lights``: a room and on/off from small fixed sets) -- the values are words of the request
  from a closed vocabulary every split shares: classification, not copying.
* ``none`` (``time``, ``battery``: no arguments) -- choosing the tool is the whole call.

Departure from BFCL (documented here, the one place): BFCL's live entries nearly all need argument values
copied from the request; the twin's live score therefore rises through the call format, tool choice and
``closed`` arguments, which is what SFT of a 0.9M model moves. Each eval request is held
out: it ends with a courtesy no training request has (``COURTESY``: " Thanks."), and ``copy`` tools' eval
requests also carry (phrasing, arguments) pairs never seen in training. The tool's own words stay those of
training: eval phrasings unlike any training phrasing were answered with the refusal (measured). Tool schemas
are short (two arguments at most) so that a request with its tool docs fits the tiny model's context.
Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any


def _tool(name: str, description: str, **props: str) -> dict[str, Any]:
    return {"name": name, "description": description,
            "parameters": {"type": "dict", "properties": {k: {"type": t} for k, t in props.items()},
                           "required": list(props)}}  # fmt: skip


TOOLS: dict[str, dict[str, Any]] = {
    "add": _tool("add", "Add two integers.", a="integer", b="integer"),
    "weather": _tool("weather", "Weather of a city.", city="string"),
    "lights": _tool("lights", "Switch the lights of a room.", room="string", state="string"),
    "time": _tool("time", "Current time."),
    "battery": _tool("battery", "Battery level."),
}
KINDS = {"add": "copy", "weather": "copy", "lights": "closed", "time": "none", "battery": "none"}
# training and eval draw cities from disjoint lists (there are too few (template, city) pairs to hold some out)
CITIES = {"train": ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Dakar", "Quito", "Perth", "Riga"),
          "eval": ("Bern", "Kyiv", "Doha", "Baku", "Accra", "Hanoi", "Sofia", "Tunis", "Minsk", "Dhaka")}
ROOMS = ("kitchen", "bedroom", "garage", "office")  # `lights` values: every split draws from these
STATES = ("on", "off")
# phrasings per tool (every split); eval requests end with a courtesy training never has (COURTESY)
REQUESTS: dict[str, tuple[str, ...]] = {
    "add": ("What is {a} plus {b}?", "Add {a} and {b}."),
    "weather": ("Weather in {city}?", "How is the weather in {city}?"),
    "lights": ("Turn {state} the {room} lights.", "Switch the {room} lights {state}."),
    "time": ("What time is it?", "Tell me the time."),
    "battery": ("How much battery is left?", "Check the battery."),
}
COURTESY = {"train": ("", " Please."), "eval": (" Thanks.",)}
IRRELEVANT = ("Tell me a joke.", "Who wrote Hamlet?", "Translate hello to French.", "Sing me a song.",
              "What is your name?", "Recommend a book.", "Write a poem about rain.", "How tall is Everest?")  # fmt: skip
REFUSAL = "Due to the limitations of the function, I cannot solve this problem."  # = acebench SPECIAL_TARGETS


def _args(rng: random.Random, name: str, split: str) -> dict[str, Any]:
    if name == "add":
        return {"a": rng.randint(10, 99), "b": rng.randint(10, 99)}
    if name == "weather":
        return {"city": rng.choice(CITIES[split])}
    if name == "lights":
        return {"room": rng.choice(ROOMS), "state": rng.choice(STATES)}
    return {}


def _tools(rng: random.Random, needed: list[str], n_extra: int) -> list[dict[str, Any]]:
    others = [t for t in TOOLS if t not in needed]
    names = list(dict.fromkeys(needed)) + rng.sample(others, min(n_extra, len(others)))
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


class _Stream:
    """Requests of one split; a ``copy`` tool's never repeat a (template, arguments) pair of ``banned``."""

    def __init__(self, seed: int, split: str, banned: set | None = None):
        self.rng = random.Random(seed)
        self.split = split
        self.banned = banned if banned is not None else set()
        self.seen: set = set()

    def call(self, name: str | None = None, exclude: tuple[str, ...] = ()) -> tuple[str, dict[str, Any], str]:
        for _ in range(1000):
            n = name or self.rng.choice([t for t in TOOLS if t not in exclude])
            args = _args(self.rng, n, self.split)
            tmpl = self.rng.choice(REQUESTS[n])
            key = (tmpl, json.dumps(args, sort_keys=True))
            if KINDS[n] != "copy" or key not in self.banned:  # the others' few pairs: held out by COURTESY
                self.seen.add(key)
                return n, args, tmpl.format(**args) + self.rng.choice(COURTESY[self.split])
        raise RuntimeError("tiny tool data: ran out of fresh requests")

    def pair(self) -> tuple[tuple[str, dict, str], tuple[str, dict, str]]:
        """Two requests for one message; a tool without arguments is not asked twice (the same request)."""
        first = self.call()
        second = self.call(exclude=(first[0],) if KINDS[first[0]] == "none" else ())
        return first, second


def _dump(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _answer(name: str, args: dict[str, Any]) -> dict[str, dict[str, list]]:
    return {name: {k: [v] for k, v in args.items()}}  # BFCL's possible-answer layout


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
        (n1, a1, t1), (n2, a2, t2) = train.pair()
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
    with_args = [t for t in TOOLS if KINDS[t] != "none"]  # live_parallel asks one tool twice
    bfcl = out / "bfcl"
    cats: dict[str, list[tuple[dict, Any]]] = {c: [] for c in ("live_simple", "live_multiple", "live_parallel",
                                                                "live_parallel_multiple", "irrelevance",
                                                                "live_irrelevance")}  # fmt: skip
    for _ in range(n_eval_per_category):
        name, args, text = ev.call()
        cats["live_simple"].append(({"question": [[{"role": "user", "content": text}]], "function": [TOOLS[name]]},
                                    [_answer(name, args)]))
        name, args, text = ev.call()
        cats["live_multiple"].append(({"question": [[{"role": "user", "content": text}]],
                                       "function": _tools(ev.rng, [name], ev.rng.randint(1, 2))},
                                      [_answer(name, args)]))
        name = ev.rng.choice(with_args)
        (n1, a1, t1), (n2, a2, t2) = ev.call(name), ev.call(name)
        cats["live_parallel"].append(({"question": [[{"role": "user", "content": f"{t1} And {t2}"}]],
                                       "function": [TOOLS[name]]}, [_answer(n1, a1), _answer(n2, a2)]))
        n1, n2 = ev.rng.sample(list(TOOLS), 2)
        (n1, a1, t1), (n2, a2, t2) = ev.call(n1), ev.call(n2)
        cats["live_parallel_multiple"].append(({"question": [[{"role": "user", "content": f"{t1} And {t2}"}]],
                                                "function": _tools(ev.rng, [n1, n2], ev.rng.randint(0, 1))},
                                               [_answer(n1, a1), _answer(n2, a2)]))  # fmt: skip
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


__all__ = ["KINDS", "TOOLS", "make_tiny_tool_data"]
