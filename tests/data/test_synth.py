"""Synthetic tiny math data: arithmetic in every trace is right, schema is the OpenR1 one, determinism, disjointness."""

import hashlib
import json
import re

import pyarrow.parquet as pq
import pytest

from eksft_pipeline.data.schema import DataError, validate_row
from eksft_pipeline.data.synth import (
    FAMILIES,
    add_trace,
    generate_problems,
    linear_trace,
    make_tiny_data,
    mul_trace,
    sub_trace,
    to_openr1_rows,
)

BOXED = re.compile(r"\\boxed\{(-?\d+)\}")
# every "p op q [op r] = v" equation written in a trace, e.g. "7 * 4 + 4 = 32", "135 / 9 = 15", "15 - 9 = 6"
EQUATION = re.compile(r"(-?\d+(?: [-+*/] -?\d+)+) = (-?\d+)")


def _check_trace(trace: str, expected: int) -> None:
    assert trace.startswith("<think>\n")
    assert "\n</think>\n\n" in trace
    boxed = BOXED.findall(trace)
    assert boxed == [str(expected)], trace
    for lhs, rhs in EQUATION.findall(trace.replace("x = ", "")):
        # evaluate left to right (the traces only chain + and -, or a single * or /)
        assert eval(lhs) == int(rhs), f"wrong step {lhs} = {rhs} in\n{trace}"  # noqa: S307 - digits/operators only


def test_addition_traces_exhaustive():
    for a in range(100):
        for b in range(0, 100, 7):
            trace, ans = add_trace(a, b)
            assert ans == a + b
            _check_trace(trace, a + b)


def test_subtraction_traces_exhaustive():
    for a in range(10, 100):
        for b in range(0, a + 1, 3):
            trace, ans = sub_trace(a, b)
            assert ans == a - b
            _check_trace(trace, a - b)
    with pytest.raises(ValueError):
        sub_trace(3, 5)


def test_multiplication_traces_exhaustive():
    for a in range(2, 10):
        for b in range(2, 100):
            trace, ans = mul_trace(a, b)
            assert ans == a * b
            _check_trace(trace, a * b)


def test_linear_traces():
    for a in range(2, 10):
        for x in range(-9, 21):
            for b in (-30, -7, 1, 13, 30):
                trace, ans = linear_trace(a, b, a * x + b)
                assert ans == x
                assert BOXED.findall(trace) == [str(x)]
                assert f"x = {a * x} / {a} = {x}" in trace
    with pytest.raises(ValueError):
        linear_trace(3, 1, 5)  # 3x + 1 = 5 has no integer solution


def test_generated_rows_are_valid_openr1_rows_and_unique():
    probs = generate_problems(600, seed=3, mix={f: 1.0 for f in FAMILIES})
    assert len({p["problem"] for p in probs}) == 600
    assert {p["data_source"] for p in probs} == set(FAMILIES)
    assert {p["data_source"] for p in generate_problems(200, seed=3)} == {"tiny_add", "tiny_sub"}  # the default
    rows = to_openr1_rows(probs, system_prompt="SYS")
    for i, r in enumerate(rows):
        assert set(r) == {"data_source", "prompt", "target", "ability", "reward_model", "extra_info"}
        assert [m["role"] for m in r["prompt"]] == ["system", "user"] and r["prompt"][0]["content"] == "SYS"
        assert r["reward_model"] == {"ground_truth": probs[i]["answer"], "style": "rule"}
        assert r["extra_info"] == {"index": i, "split": "default"}
        clean, reason = validate_row(r, think_prefix="prompt")
        assert reason is None, reason
        assert BOXED.findall(r["target"][0]["content"]) == [r["reward_model"]["ground_truth"]]


def test_mix_and_errors():
    only_add = generate_problems(50, seed=1, mix={"tiny_add": 1.0})
    assert {p["data_source"] for p in only_add} == {"tiny_add"}
    with pytest.raises(DataError, match="tiny_div"):
        generate_problems(5, mix={"tiny_div": 1.0})
    # the multiplication pool has 8 * 98 * 3 = 2352 distinct texts: asking for more must fail loudly
    with pytest.raises(DataError, match="unique problems"):
        generate_problems(2400, seed=0, mix={"tiny_mul": 1.0}, max_tries_factor=3)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_make_tiny_data_deterministic_and_disjoint(tmp_path):
    a = make_tiny_data(tmp_path / "a", n_problems=300, n_eval_per_source=20, n_pretrain=200, seed=5)
    b = make_tiny_data(tmp_path / "b", n_problems=300, n_eval_per_source=20, n_pretrain=200, seed=5)
    c = make_tiny_data(tmp_path / "c", n_problems=300, n_eval_per_source=20, n_pretrain=200, seed=6)
    for k in ("train", "eval", "pretrain"):
        assert _sha(a[k]) == _sha(b[k]), k
        assert _sha(a[k]) != _sha(c[k]), k
    train = pq.read_table(a["train"]).to_pylist()
    ev = pq.read_table(a["eval"]).to_pylist()
    assert len(train) == 300
    assert sorted({r["data_source"] for r in ev}) == ["tiny_add", "tiny_sub"]
    assert sum(r["data_source"] == "tiny_add" for r in ev) == 20
    assert set(ev[0]) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    train_q = {r["prompt"][-1]["content"] for r in train}
    eval_q = {r["prompt"][-1]["content"] for r in ev}
    pre_q = {
        json.loads(line)["text"].split("\n\n", 1)[0].removeprefix("Problem: ")
        for line in a["pretrain"].read_text().splitlines()
    }
    assert len(pre_q) == 200
    assert not train_q & eval_q
    assert not pre_q & (train_q | eval_q)


def test_trace_checker_catches_a_wrong_step():
    trace, ans = add_trace(47, 38)
    assert trace == "<think>\n47 + 38: ones 7 + 8 = 15, tens 4 + 3 + 1 = 8.\n</think>\n\nThe answer is \\boxed{85}."
    with pytest.raises(AssertionError, match="wrong step"):
        _check_trace(trace.replace("tens 4 + 3 + 1 = 8.", "tens 4 + 3 + 1 = 9."), ans)


def test_compact_traces_read_the_answer_off_the_steps():
    """The answer's digits are the last step's result followed by the last digit of the ones step."""
    for trace, ans in (add_trace(a, b) for a in range(100) for b in range(0, 100, 3)):
        steps = re.findall(r"= (-?\d+)", trace.split(": ", 1)[1])
        expect = steps[0] if len(steps) == 1 else str(int(steps[1] + steps[0][-1]))
        assert expect == str(ans), trace
    for trace, ans in (sub_trace(a, b) for a in range(10, 100) for b in range(0, a + 1, 4)):
        ones, tens = re.findall(r"= (-?\d+)", trace.split(": ", 1)[1])
        assert int(tens) * 10 + int(ones) == ans, trace
    assert len(add_trace(99, 99)[0]) <= 91  # short: a tiny model must finish it at temperature 1


def test_pretraining_chat_documents_mostly_answer_tersely(tmp_path):
    paths = make_tiny_data(tmp_path, n_problems=50, n_eval_per_source=5, n_pretrain=400, seed=1)
    texts = [json.loads(line)["text"] for line in paths["pretrain"].read_text().splitlines()]
    chat = [t for t in texts if t.startswith("<|im_start|>")]
    plain = [t for t in texts if t.startswith("Problem: ")]
    assert len(chat) == len(plain) == 200
    with_trace = [t for t in chat if "<think>" in t]
    assert len(with_trace) == 40  # pretrain_chat_trace_frac = 0.2 of the conversations
    terse = [t for t in chat if "<think>" not in t]
    assert all(re.search(r"<\|im_start\|>assistant\nThe answer is -?\d+\.<\|im_end\|>\n$", t) for t in terse)
    assert all("\\boxed{" in t and t.count("<think>") == 1 for t in plain)


def test_sft_traces_open_with_a_preamble_no_pretraining_document_has(tmp_path):
    from eksft_pipeline.data.synth import SFT_PREAMBLE, with_preamble

    paths = make_tiny_data(tmp_path, n_problems=60, n_eval_per_source=5, n_pretrain=200, seed=2)
    train = pq.read_table(paths["train"]).to_pylist()
    for r in train:
        t = r["target"][0]["content"]
        assert t.startswith("<think>\n" + SFT_PREAMBLE + "\n"), t
        _check_trace(t, int(r["reward_model"]["ground_truth"]))
    assert SFT_PREAMBLE not in paths["pretrain"].read_text()
    assert with_preamble("<think>\nx\n</think>", "P.") == "<think>\nP.\nx\n</think>"
    plain = make_tiny_data(tmp_path / "b", n_problems=20, n_eval_per_source=2, n_pretrain=20, seed=2, sft_preamble=None)
    assert all(SFT_PREAMBLE not in r["target"][0]["content"] for r in pq.read_table(plain["train"]).to_pylist())


def test_a_share_of_plain_pretraining_documents_opens_with_the_preamble_and_no_chat_document_does(tmp_path):
    """pretrain_preamble_frac: the base model may know the SFT sentence, but never from a chat."""
    import json

    from eksft_pipeline.data.synth import SFT_PREAMBLE

    paths = make_tiny_data(tmp_path, n_problems=40, n_eval_per_source=2, n_pretrain=400, seed=3,
                           pretrain_chat_frac=0.5, pretrain_preamble_frac=0.25)  # fmt: skip
    docs = [json.loads(line)["text"] for line in paths["pretrain"].read_text().splitlines()]
    plain = [d for d in docs if d.startswith("Problem: ")]
    chat = [d for d in docs if d.startswith("<|im_start|>")]
    assert len(plain) == 200 and len(chat) == 200
    with_it = [d for d in plain if "<think>\n" + SFT_PREAMBLE + "\n" in d]
    assert len(with_it) == 50  # a quarter of the 200 plain documents, deterministic interleaving
    assert not any(SFT_PREAMBLE in d for d in chat)
    # the rest of each document is unchanged: removing the sentence gives back the frac=0 corpus
    base = make_tiny_data(tmp_path / "b", n_problems=40, n_eval_per_source=2, n_pretrain=400, seed=3,
                          pretrain_chat_frac=0.5)  # fmt: skip
    base_docs = [json.loads(line)["text"] for line in base["pretrain"].read_text().splitlines()]
    assert [d.replace(SFT_PREAMBLE + "\n", "") for d in docs] == base_docs
