"""Tool-use data: ACEBench -> SFT rows (real folder and hand-made ones), the one tool format, verl reading it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from eksft_pipeline.data.chat_template import CHATML
from eksft_pipeline.data.schema import DataError
from eksft_pipeline.data.tool_use.acebench import (
    DROP_REASONS,
    SPECIAL_TARGETS,
    history_messages,
    parse_python_calls,
    split_acebench,
)
from eksft_pipeline.data.tool_use.format import parse_tool_calls, render_tool_calls, tools_system_prompt

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]


def _render(template: str, messages, **kw) -> str:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template).render(messages=messages, **kw)


# ------------------------------------------------------------------------------------------ the format

TOOL = {"name": "get_weather", "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}  # fmt: skip
TOOL2 = {"name": "uber.ride", "description": "Book a ride.",
         "parameters": {"type": "dict", "properties": {"loc": {"type": "string"}}, "required": ["loc"]}}


def test_tools_in_the_system_turn_under_chatml_equal_qwen3s_own_rendering_with_tools():
    """The run renders docs into the system text; under chatml that is byte-identical to Qwen3-8B's template
    given tools= and tool_calls (the template Qwen3 ships, tests/data/fixtures)."""
    qwen3 = (FIXTURES / "qwen3_8b_chat_template.jinja").read_text()
    calls = [("get_weather", {"city": "Paris", "days": 2}), ("uber.ride", {"loc": "Berlin"})]
    q_msgs = [
        {"role": "user", "content": "Weather in Paris, then a ride in Berlin"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]},
        {"role": "user", "content": "thanks, again please"},
    ]  # fmt: skip
    ours = [{"role": "system", "content": tools_system_prompt([TOOL, TOOL2])},
            {"role": "user", "content": q_msgs[0]["content"]},
            {"role": "assistant", "content": render_tool_calls(calls)},
            {"role": "user", "content": q_msgs[2]["content"]}]  # fmt: skip
    expected = _render(qwen3, q_msgs, tools=[TOOL, TOOL2], add_generation_prompt=True)
    assert _render(CHATML, ours, add_generation_prompt=True) == expected
    # with a system message of its own, Qwen3 puts it before the docs
    sys_q = _render(qwen3, [{"role": "system", "content": "Be brief."}, q_msgs[0]], tools=[TOOL],
                    add_generation_prompt=True)
    sys_ours = _render(CHATML, [{"role": "system", "content": tools_system_prompt([TOOL], "Be brief.")},
                                q_msgs[0]], add_generation_prompt=True)  # fmt: skip
    assert sys_ours == sys_q


def test_parse_tool_calls_strips_thinking_and_counts_failures():
    text = render_tool_calls([("f", {"a": 1}), ("g", {"b": [1, 2]})])
    assert parse_tool_calls(text) == ([{"f": {"a": 1}}, {"g": {"b": [1, 2]}}], "ok")
    # a call written inside the thinking is not a call; the answer after </think> is
    assert parse_tool_calls("<think>\n" + render_tool_calls([("x", {})]) + "\n</think>\n\nI cannot help.") == (
        [], "no_call")
    assert parse_tool_calls("<think>hm</think>\n" + text)[1] == "ok"
    assert parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>') == (None, "parse_failure")
    assert parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "a=1"}\n</tool_call>') == (None, "parse_failure")
    assert parse_tool_calls('<tool_call>\n{"name": "f"') == (None, "parse_failure")
    assert parse_tool_calls("Sorry, no tool fits.") == ([], "no_call")


def test_history_turns_calls_and_results():
    q = ('user: book it\nsystem: Which date?\nuser: May 1\nline two\nsystem: [book(date="05-01", opts={"x": true})]'
         "\nsystem: Booked, id 7.\nuser: now cancel\n")
    msgs = history_messages(q)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user", "user"]
    assert msgs[2]["content"] == "May 1\nline two"
    assert msgs[3]["content"] == render_tool_calls([("book", {"date": "05-01", "opts": {"x": True}})])
    assert msgs[4]["content"] == "<tool_response>\nBooked, id 7.\n</tool_response>"
    assert parse_python_calls("[a.b(x=1, y=[1, null]), c()]") == [("a.b", {"x": 1, "y": [1, None]}), ("c", {})]
    assert parse_python_calls("[not a call]") is None


# ------------------------------------------------------------------------------- a hand-made ACEBench


def _write(d: Path, cat: str, rows: list[dict], golds: list[dict] | None) -> None:
    (d / "possible_answer").mkdir(parents=True, exist_ok=True)
    (d / f"data_{cat}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if golds is not None:
        (d / "possible_answer" / f"data_{cat}.json").write_text("".join(json.dumps(g) + "\n" for g in golds))


def _mini(root: Path) -> Path:
    d = root / "data_en"
    fn = [TOOL, {**TOOL2, "name": "ride"}]
    _write(d, "normal_single_turn_parallel_function",
           [{"id": "p0", "question": "user: weather in Rome and Oslo\n", "function": fn, "time": ""},
            {"id": "p1", "question": "user: a ride\nsystem: where?\n", "function": fn, "time": ""}],
           [{"id": "p0", "ground_truth": {"get_weather_1": {"city": "Rome"}, "get_weather_2": {"city": "Oslo"}}},
            {"id": "p1", "ground_truth": {"ride": {"loc": "x"}}}])  # fmt: skip
    _write(d, "special_incomplete", [{"id": "i0", "question": "user: a ride please", "function": fn}],
           [{"id": "i0", "ground_truth": {"ride": ["loc"]}}])
    _write(d, "special_error_param", [{"id": "e0", "question": "user: weather in 12#4", "function": fn}],
           [{"id": "e0", "ground_truth": {"city": ["12#4"]}}])
    _write(d, "special_irrelevant", [{"id": "r0", "question": "user: sing a song", "function": fn}],
           [{"id": "r0", "ground_truth": "Due to the limitations of the function, I cannot solve this problem."}])
    _write(d, "agent_multi_turn", [{"id": "a0", "question": "You are Grace.", "function": fn}],
           [{"id": "a0", "ground_truth": [{"BaseApi": {}}]}])
    return root


def test_mini_acebench_targets_and_counts(tmp_path):
    rep = split_acebench(_mini(tmp_path / "ace"), tmp_path / "out", seed=3)
    assert (rep["n_input"], rep["n_sft"], rep["n_dropped"]) == (6, 4, 2)
    assert rep["dropped"] == {**dict.fromkeys(DROP_REASONS, 0), "agent_no_single_target": 1, "last_turn_not_user": 1}
    assert rep["n_sft"] + rep["n_unused"] + rep["n_dropped"] == rep["n_input"]
    rows = {r["ace_id"]: r for r in pq.read_table(tmp_path / "out" / "sft_train.parquet").to_pylist()}
    assert set(rows) == {"p0", "i0", "e0", "r0"}
    # parallel gold with _1/_2 suffixes -> two calls of the bare name
    assert rows["p0"]["messages"][-1]["content"] == render_tool_calls(
        [("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Oslo"})])
    assert rows["i0"]["messages"][-1]["content"] == SPECIAL_TARGETS["special_incomplete"]["en"].format(
        func="ride", params="loc")
    assert rows["e0"]["messages"][-1]["content"] == (
        "There is incorrect value (12#4) for the parameters (city) in the conversation history.")
    assert rows["r0"]["messages"][-1]["content"] == SPECIAL_TARGETS["special_irrelevant"]["en"]
    for r in rows.values():
        assert r["messages"][0]["role"] == "system" and "<tools>" in r["messages"][0]["content"]
        assert json.loads(r["tools_json"])[0]["name"] == "get_weather"
    dropped = [json.loads(x) for x in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert sorted(d["ace_id"] for d in dropped) == ["en/a0", "en/p1"]
    # deterministic, byte for byte; n_sft draws a subset
    rep2 = split_acebench(tmp_path / "ace", tmp_path / "out2", seed=3)
    assert rep2["sha256"] == rep["sha256"]
    rep3 = split_acebench(tmp_path / "ace", tmp_path / "out3", seed=3, n_sft=2)
    assert (rep3["n_sft"], rep3["n_unused"]) == (2, 2)


def test_bad_input_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="ACEBench folder not found: no data_en/"):
        split_acebench(tmp_path / "nowhere", tmp_path / "o")
    root = _mini(tmp_path / "a")
    (root / "data_en" / "possible_answer" / "data_special_irrelevant.json").unlink()
    with pytest.raises(DataError, match=r"gold file missing for special_irrelevant: .*possible_answer"):
        split_acebench(root, tmp_path / "o")
    root = _mini(tmp_path / "b")
    _write(root / "data_en", "special_irrelevant", [{"id": "r0", "question": "user: x", "function": [TOOL]},
                                                    {"id": "r9", "question": "user: y", "function": [TOOL]}],
           [{"id": "r0", "ground_truth": "no"}])  # fmt: skip
    with pytest.raises(DataError, match=r"data_special_irrelevant.json:2 \(id r9\): no gold answer"):
        split_acebench(root, tmp_path / "o")
    root = _mini(tmp_path / "c")
    _write(root / "data_en", "special_irrelevant", [{"id": "r0", "question": "user: x", "function": "[{'name': 1"}],
           [{"id": "r0", "ground_truth": "no"}])
    with pytest.raises(DataError, match=r"id r0\): tool schema \('function'\) is not JSON"):
        split_acebench(root, tmp_path / "o")
    for err in (pytest.raises(DataError),):
        with err as e:
            split_acebench(_mini(tmp_path / "d"), tmp_path / "o", langs=["fr"])
        assert "\n" not in str(e.value) and "unknown ACEBench language" in str(e.value)
    assert not (tmp_path / "o" / "sft_train.parquet").exists()  # nothing written before validation


def test_verl_multiturn_dataset_reads_tool_rows(tmp_path, monkeypatch):
    """verl's MultiTurnSFTDataset accepts the rows (its per-turn == whole-conversation check passes) and puts the
    assistant turns, tool calls included, in the loss."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from eksft_pipeline.models.tokenizer import build_tiny_tokenizer, render_chatml

    split_acebench(_mini(tmp_path / "ace"), tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / "sft_train.parquet").to_pylist()
    tok = build_tiny_tokenizer(tmp_path / "tok", [render_chatml(r["messages"]) for r in rows] * 4, vocab_size=400)
    ds = MultiTurnSFTDataset(str(tmp_path / "out" / "sft_train.parquet"), tok,
                             {"messages_key": "messages", "max_length": 2048, "truncation": "error",
                              "pad_mode": "right"})  # fmt: skip
    for k, row in enumerate(rows):
        item = ds[k]
        n = int(item["attention_mask"].sum())
        assert tok.decode(item["input_ids"][:n]) == render_chatml(row["messages"])
        in_loss = tok.decode(item["input_ids"][item["loss_mask"].bool()])
        assert in_loss == row["messages"][-1]["content"] + "<|im_end|>\n"


# ---------------------------------------------------------------------------------- the real ACEBench


def _shared_acebench() -> Path:
    env = os.environ.get("EKSFT_SHARED_DIR")
    base = Path(env) if env else REPO.parent / "shared"
    return base / "data" / "acebench" / "data_all"


@pytest.fixture
def acebench_dir() -> Path:
    d = _shared_acebench()
    if (d / "data_en").is_dir():
        return d
    msg = f"shared ACEBench missing: {d} (set EKSFT_SHARED_DIR=<dir holding data/acebench/>)"
    if os.environ.get("EKSFT_REQUIRE_SHARED", "").strip() in ("1", "true", "yes") or os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_real_acebench_every_row_counted(acebench_dir, tmp_path, lang):
    rep = split_acebench(acebench_dir, tmp_path, langs=[lang])
    d = acebench_dir / f"data_{lang}"
    lines = {f.stem[5:]: sum(1 for x in f.read_text(encoding="utf-8").splitlines() if x.strip())
             for f in d.glob("data_*.json")}  # fmt: skip
    assert rep["n_input"] == sum(lines.values())
    for cat, n in lines.items():
        c = rep["per_category"][f"{lang}/{cat}"]
        assert c["input"] == n, cat
        assert c.get("kept", 0) + sum(c.get(r, 0) for r in DROP_REASONS) == n, cat
        if cat.startswith("agent_"):
            assert c["agent_no_single_target"] == n
        if cat.startswith("special_"):
            assert c["kept"] == n == 50
    assert rep["dropped"]["agent_no_single_target"] == 50
    assert rep["n_sft"] + rep["n_dropped"] == rep["n_input"] and rep["n_unused"] == 0
    assert sum(rep["dropped"].values()) == rep["n_dropped"] == len((tmp_path / "dropped.jsonl").read_text().splitlines())
    assert rep["n_sft"] > 900  # ~970 usable rows per language (shared/README: ~1,940 in both)
    rows = {r["ace_id"]: r for r in pq.read_table(tmp_path / "sft_train.parquet").to_pylist()}
    assert len(rows) == rep["n_sft"]
    for r in rows.values():
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
        if r["data_source"].startswith("acebench/normal"):
            calls, status = parse_tool_calls(r["messages"][-1]["content"])
            assert status == "ok" and calls, r["ace_id"]
    if lang == "en":
        # hand-read rows: a parallel gold, a multi-turn history with an earlier call, the special targets
        par = parse_tool_calls(rows["normal_single_turn_parallel_function_0"]["messages"][-1]["content"])[0]
        assert [next(iter(c)) for c in par] == ["MediaDesignOptimizer_createVisualContent",
                                                 "fashion_week_trend_analyzer"]
        hist = rows["normal_multi_turn_user_adjust_0_1"]["messages"]
        assert hist[4]["content"].startswith('<tool_call>\n{"name": "branding_createPressRelease"')
        assert hist[5]["content"] == ("<tool_response>\nYour press release has been created successfully with the "
                                      "ID 12345.\n</tool_response>")
        assert rows["special_incomplete_3"]["messages"][-1]["content"] == (
            "Missing necessary parameters (climate_predict_sea_level_rise: latitude, longitude), please provide the "
            "necessary parameters.")
        assert rows["special_error_param_6"]["messages"][-1]["content"] == (
            "There is incorrect value (ABC123, XYZ@4321) for the parameters (device_id, compare_with) in the "
            "conversation history.")


# ---------------------------------------------------------------------------------------- the CPU twin


def test_tiny_twin_layouts_disjoint_and_scored_right_by_bfcl(tmp_path):
    """The twin's training folder converts like ACEBench, its eval folder loads like BFCL, no eval request is a
    training request, and BFCL's checker scores the gold answers as right and a refusal as wrong."""
    from eksft_pipeline.data.tool_use.tiny import make_tiny_tool_data

    paths = make_tiny_tool_data(tmp_path / "twin", n_train=120, n_eval_per_category=8, seed=5)
    rep = split_acebench(paths["acebench"], tmp_path / "split")
    assert rep["n_input"] == 120 and rep["n_sft"] + rep["n_dropped"] == 120
    cats = rep["n_sft_per_category"]
    assert cats["acebench/special_irrelevant"] >= 1 and cats["acebench/normal_single_turn_parallel_function"] >= 1
    train_users = {r["messages"][1]["content"] for r in pq.read_table(tmp_path / "split" / "sft_train.parquet").to_pylist()}
    assert make_tiny_tool_data(tmp_path / "again", n_train=120, n_eval_per_category=8, seed=5) and (
        (tmp_path / "again" / "bfcl" / "BFCL_v4_live_simple.json").read_text()
        == (tmp_path / "twin" / "bfcl" / "BFCL_v4_live_simple.json").read_text())  # deterministic

    bfcl = pytest.importorskip("eksft_pipeline.eval.bfcl")
    if __import__("importlib").util.find_spec("bfcl_eval") is None:
        pytest.skip("bfcl-eval not installed")
    for cat in bfcl.CATEGORIES:
        entries = bfcl.load_category(cat, paths["bfcl"])
        assert len(entries) == 8
        for e in entries:
            assert e["question"][0][-1]["content"] not in train_users or cat.endswith("irrelevance")
            if e["possible_answer"] is None:
                assert bfcl.score_entry(cat, e, SPECIAL_TARGETS["special_irrelevant"]["en"])["correct"]
                continue
            gold = render_tool_calls([(n, {k: v[0] for k, v in a.items()}) for g in e["possible_answer"]
                                      for n, a in g.items()])  # fmt: skip
            assert bfcl.score_entry(cat, e, gold)["correct"], e
            assert not bfcl.score_entry(cat, e, SPECIAL_TARGETS["special_irrelevant"]["en"])["correct"]


def test_run_tokenizer_gets_tool_call_tokens_as_qwen3_has_them(tmp_path):
    """The tiny tokenizer gets <tool_call> / </tool_call> as one added (non-special) token each when the model has
    spare embedding rows -- shorter targets, the same text, kept by decode(skip_special_tokens=True) as the eval
    decodes; no room, or tokens already there (Qwen3), adds nothing."""
    from transformers import AutoTokenizer

    from eksft_pipeline.data.tool_use.format import TOOL_CALL_TOKENS, add_tool_call_tokens
    from eksft_pipeline.models.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(None, ["What is 3 plus 4?", '{"name": "add", "arguments": {"a": 3}}'] * 20,
                               vocab_size=300)  # fmt: skip
    call = render_tool_calls([("add", {"a": 3, "b": 4})])
    before = len(tok(call).input_ids)
    assert add_tool_call_tokens(tok, len(tok) + 1) == []  # no room for both
    n = len(tok)
    assert add_tool_call_tokens(tok, n + 2) == list(TOOL_CALL_TOKENS)
    ids = tok(call).input_ids
    assert len(tok) == n + 2 and ids[0] == n and ids[-1] == n + 1 and len(ids) < before
    assert ids[1:-1] == tok(call[len("<tool_call>"): -len("</tool_call>")]).input_ids  # the JSON between: unchanged
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(call).input_ids == ids and again.decode(ids, skip_special_tokens=True) == call
    assert parse_tool_calls(again.decode(ids, skip_special_tokens=True))[1] == "ok"
    assert add_tool_call_tokens(again, n + 100) == []  # already there (as in Qwen3's tokenizer)


def test_twin_format_tokens_keep_the_text_and_shorten_rows():
    """The twin's tool-format tokens change the tokenization only: a rendered tool prompt and call decode to the same
    text, in far fewer tokens; a model without enough spare rows gets a one-line error, not a silent half-set."""
    from eksft_pipeline.data.tool_use import format as fmt
    from eksft_pipeline.data.tool_use.tiny import TOOLS
    from eksft_pipeline.models.tokenizer import build_tiny_tokenizer

    text = fmt.tools_system_prompt([TOOLS["add"], TOOLS["time"]]) + "\n" + render_tool_calls([("add", {"a": 3, "b": 4})])
    tok = build_tiny_tokenizer(None, ["What is 3 plus 4?", "The answer is 7."] * 20, vocab_size=300)
    fmt.add_tool_call_tokens(tok, len(tok) + 2)
    before = tok(text).input_ids
    n, k = len(tok), len(fmt.TWIN_FORMAT_TOKENS)
    with pytest.raises(fmt.ToolFormatError, match="do not fit"):
        fmt.add_twin_format_tokens(tok, n + k - 1)
    assert len(tok) == n and fmt.add_twin_format_tokens(tok, n + k) == list(fmt.TWIN_FORMAT_TOKENS)
    ids = tok(text).input_ids
    assert tok.decode(ids) == tok.decode(before) == text
    assert len(ids) * 3 < len(before)  # header, footer and JSON keys: one token each
    call = tok(render_tool_calls([("add", {"a": 3, "b": 4})])).input_ids
    assert len(call) < 30 and parse_tool_calls(tok.decode(call))[0] == [{"add": {"a": 3, "b": 4}}]
