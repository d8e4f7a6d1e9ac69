"""The labelled verifier corpus: deterministic, labels from construction, and the accuracy target on its
held-out part (this project's verifier: at most half the false negatives of plain math-verify, no more false
positives)."""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

from devtools import verifier_corpus as vc  # scripts/devtools (tests/conftest.py puts scripts/ on sys.path)

from eksft_pipeline.scoring import reward


def test_corpus_is_deterministic_and_split_by_gold():
    a, b = vc.build_corpus(seed=0), vc.build_corpus(seed=0)
    assert a == b and len(a) > 1000
    c = vc.build_corpus(seed=1)
    assert [it.completion for it in c] != [it.completion for it in a]
    for split_items in (a, c):  # held-out golds are the same whatever the seed
        assert {it.gold for it in split_items if it.split == "heldout"} == {it.gold for it in a if it.split == "heldout"}
    per_gold = {}
    for it in a:
        per_gold.setdefault(it.gold, set()).add(it.split)
    assert all(len(s) == 1 for s in per_gold.values())  # a gold and all its forms are in one part
    frac = sum(s == {"heldout"} for s in per_gold.values()) / len(per_gold)
    assert 0.2 < frac < 0.4
    counts = Counter(it.label for it in a)
    assert counts[True] > 400 and counts[False] > 400
    assert len({it.family for it in a}) >= 12


def test_labels_come_from_construction():
    r = random.Random(0)
    right, wrong, fam = vc.forms_for("math", "\\frac{1}{576}", r, [])
    assert fam == "number"
    assert ("policy:rounded_few_sig", "0.001736") in wrong  # math-verify's 6-decimal rounding: a wrong answer
    assert ("policy:rounded_8sig", "0.0017361111") in right
    right, wrong, fam = vc.forms_for("amc", "3375", r, [])
    assert fam == "integer" and ("thousands_thin_space", "3\\,375") in right and ("off_by_one", "3376") in wrong
    assert any(t.startswith("choice_label") for t, _ in right)
    right, wrong, fam = vc.forms_for("math", "\\frac{4}{9}", r, [])
    assert ("repeating_decimal", "0.\\overline{4}") in right and ("repeating_wrong_period", "0.\\overline{5}") in wrong
    right, wrong, fam = vc.forms_for("math", "(-\\infty,3]", r, [])
    assert fam == "interval" and ("inequality", "x \\le 3") in right and ("right_bracket_flipped", "(-\\infty, 3)") in wrong
    right, wrong, fam = vc.forms_for("math", "(6,31,-1)", r, [])
    assert fam == "tuple" and ("policy:bare_list_reordered", "31, -1, 6") in wrong
    right, _, fam = vc.forms_for("math", "1 \\pm \\sqrt{19}", r, [])
    assert fam == "pm" and ("expanded", "1 + \\sqrt{19}, 1 - \\sqrt{19}") in right
    # recognition is the corpus's own (exact arithmetic), not the verifier's
    assert vc.classify("58,500") == ("integer", vc.Num(Fraction(58500)))
    assert vc.classify("\\frac{3\\sqrt{5}}{7}")[1] == vc.Num(Fraction(3, 7), 5)
    assert vc.repeating(Fraction(7, 12)) == "0.58\\overline{3}" and vc.sig_round(vc.Num(Fraction(1, 3)).value(), 4) == "0.3333"


def _check_target(items: list[vc.CorpusItem]) -> tuple[dict, dict]:
    reward.clear_cache()
    ours = vc.rates(items, [r["acc"] == 1.0 for r in vc.score_corpus(items, "project")])
    plain = vc.rates(items, [r["acc"] == 1.0 for r in vc.score_corpus(items, "plain")])
    assert plain["fn"] > 0, "plain math-verify makes no mistake here: the corpus tests nothing"
    assert ours["fn"] <= 0.5 * plain["fn"], (ours, plain)
    assert ours["fp"] <= plain["fp"], (ours, plain)
    return ours, plain


def test_heldout_target_on_the_builtin_golds():
    items = [it for it in vc.build_corpus() if it.split == "heldout"]
    assert len(items) > 250
    _check_target(items)


def test_heldout_target_on_real_eval_golds(shared_eval_parquet):
    path = shared_eval_parquet
    golds = vc.shared_golds(path)
    assert len(golds) > 300
    items = [it for it in vc.build_corpus(golds) if it.split == "heldout"]
    sample = items[::5]  # a deterministic fifth keeps this test within a few seconds
    ours, plain = _check_target(sample)
    assert {it.source for it in sample} >= {"aime", "aime25", "amc", "math"}
