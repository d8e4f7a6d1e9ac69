"""Split stage: determinism, disjointness, counted drops, column errors, think_prefix modes, length filter."""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from eksft_pipeline.data.schema import SYSTEM_PROMPT, DataError, SplitOverlapError
from eksft_pipeline.data.split import check_disjoint, load_source, read_split_report, split_dataset
from eksft_pipeline.data.synth import generate_problems, make_tiny_data, to_openr1_rows, write_jsonl
from eksft_pipeline.models.tokenizer import build_tiny_tokenizer, render_chatml

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"
SAMPLE = SAMPLES / "openr1_math_sample.jsonl"
BAD = SAMPLES / "openr1_math_bad_rows.jsonl"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny"), n_problems=400, n_eval_per_source=4, n_pretrain=10, seed=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    probs = generate_problems(300, seed="tok")
    rows = to_openr1_rows(probs)
    corpus = [render_chatml(r["prompt"] + r["target"]) for r in rows]
    corpus += [json.loads(line)["target"][0]["content"] for line in SAMPLE.read_text().splitlines()]
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), corpus, vocab_size=512)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _source_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_split_is_byte_deterministic_and_seed_dependent(tiny_data, tmp_path):
    kw = dict(n_sft=50, n_rl=300, progress=False)
    a = split_dataset(tiny_data["train"], tmp_path / "a", seed=42, **kw)
    b = split_dataset(tiny_data["train"], tmp_path / "b", seed=42, **kw)
    c = split_dataset(tiny_data["train"], tmp_path / "c", seed=43, **kw)
    for name in ("sft_train.parquet", "rl_train.parquet", "sft_ids.json", "rl_ids.json", "dropped.jsonl"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name), name
    assert (tmp_path / "a" / "split_report.json").read_text() == (tmp_path / "b" / "split_report.json").read_text()
    assert a.sft_ids == b.sft_ids and a.rl_ids == b.rl_ids
    assert a.sft_ids != c.sft_ids
    assert _sha(tmp_path / "a" / "sft_train.parquet") != _sha(tmp_path / "c" / "sft_train.parquet")
    # the report's hashes are the files' hashes
    rep = read_split_report(tmp_path / "a")
    assert rep["sha256"]["sft"] == _sha(tmp_path / "a" / "sft_train.parquet")
    assert rep["sha256"]["rl"] == _sha(tmp_path / "a" / "rl_train.parquet")


def test_split_contents_match_source_and_are_disjoint(tiny_data, tmp_path):
    rep = split_dataset(tiny_data["train"], tmp_path, n_sft=60, seed=7, progress=False)
    src = _source_rows(tiny_data["train"])
    assert rep.n_sft == 60 and rep.n_rl == 340 and rep.n_unused == 0 and rep.n_dropped == 0
    assert not set(rep.sft_ids) & set(rep.rl_ids)
    assert sorted(rep.sft_ids + rep.rl_ids) == list(range(400))
    assert json.loads((tmp_path / "sft_ids.json").read_text()) == rep.sft_ids == sorted(rep.sft_ids)
    sft = pq.read_table(tmp_path / "sft_train.parquet").to_pylist()
    rl = pq.read_table(tmp_path / "rl_train.parquet").to_pylist()
    assert [r["id"] for r in sft] == rep.sft_ids
    assert [r["extra_info"]["index"] for r in rl] == rep.rl_ids
    for r in sft:
        s = src[r["id"]]
        assert r["messages"] == s["prompt"] + s["target"]  # system prompt kept, think prefix kept
        assert r["ground_truth"] == s["reward_model"]["ground_truth"] and r["data_source"] == s["data_source"]
    for r in rl:
        s = src[r["extra_info"]["index"]]
        assert r["prompt"] == s["prompt"] and r["reward_model"] == s["reward_model"]
        assert r["extra_info"]["split"] == "rl_train" and r["ability"] == "math"
    assert rep.length_check.startswith("skipped") and rep.token_stats == {"sft": None, "rl": None}


def test_n_rl_cap_leaves_unused_rows(tiny_data, tmp_path):
    rep = split_dataset(tiny_data["train"], tmp_path, n_sft=30, n_rl=200, seed=0, progress=False)
    assert (rep.n_sft, rep.n_rl, rep.n_unused) == (30, 200, 170)


def test_check_disjoint_fires():
    check_disjoint([1, 2], [3, 4], ["a", "b"], ["c", "d"])  # disjoint: no error
    with pytest.raises(SplitOverlapError, match="original index"):
        check_disjoint([1, 2], [2, 3], ["a", "b"], ["c", "d"])
    with pytest.raises(SplitOverlapError, match="normalised prompt"):
        check_disjoint([1, 2], [3, 4], ["What is 2+2?", "b"], ["c", "  what IS\n2+2? "])


def _rows_with_duplicates(n_unique: int) -> list[dict]:
    rows = to_openr1_rows(generate_problems(n_unique, seed="dup"))
    dups = []
    for r in rows:
        d = copy.deepcopy(r)
        d["prompt"][1]["content"] = "  " + d["prompt"][1]["content"].upper() + "\n"  # same after normalisation
        dups.append(d)
    return rows + dups


def test_duplicates_are_dropped_or_the_overlap_check_fires(tmp_path):
    src = write_jsonl(_rows_with_duplicates(30), tmp_path / "dups.jsonl")
    rep = split_dataset(src, tmp_path / "ok", n_sft=10, seed=0, progress=False)
    assert rep.dropped["duplicate_prompt"] == 30 and rep.n_valid == 30
    dropped = [json.loads(line) for line in (tmp_path / "ok" / "dropped.jsonl").read_text().splitlines()]
    assert [d["index"] for d in dropped] == list(range(30, 60))
    assert dropped[0]["detail"] == "same prompt as row 0"
    with pytest.raises(SplitOverlapError):
        split_dataset(src, tmp_path / "bad", n_sft=30, seed=0, dedupe_prompts=False, progress=False)


def test_bad_rows_counted_per_reason(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(BAD, d / BAD.name)
    shutil.copy(SAMPLE, d / SAMPLE.name)
    rep = split_dataset(d, tmp_path / "out", n_sft=8, seed=0, progress=False)
    # one defect per bad row, as written in data/samples/README (data/README.md): rows 0..12, then a truncated line
    expected = {
        "missing_answer": 2,  # rows 0 (empty) and 1 (absent)
        "empty_trace": 1,
        "target_bad_message": 2,  # rows 3 (no message) and 8 (role user)
        "prompt_not_list": 1,
        "prompt_bad_message": 1,
        "bad_answer_type": 1,
        "prompt_no_user": 1,
        "bad_data_source": 1,
        "bad_reward_model": 1,
        "missing_field": 1,
        "target_not_list": 1,
        "invalid_json": 1,
    }
    assert {k: v for k, v in rep.dropped.items() if v} == expected
    assert rep.n_input == 14 + 24 and rep.n_valid == 24 and (rep.n_sft, rep.n_rl) == (8, 16)
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert [x["index"] for x in dropped] == list(range(14))
    assert [x["reason"] for x in dropped[:4]] == [
        "missing_answer",
        "missing_answer",
        "empty_trace",
        "target_bad_message",
    ]
    assert dropped[13]["reason"] == "invalid_json"
    assert set(rep.sft_ids + rep.rl_ids) == set(range(14, 38))


def test_source_errors_name_the_thing(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="missing_file.parquet"):
        split_dataset(tmp_path / "missing_file.parquet", tmp_path / "o", n_sft=1, progress=False)
    # "data/typo" looks like a hub name, but "data" is a local folder: a missing path, not a download
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="input not found: data/no_such_dir"):
        load_source("data/no_such_dir")
    rows = to_openr1_rows(generate_problems(5, seed=0))
    no_target = write_jsonl([{k: v for k, v in r.items() if k != "target"} for r in rows], tmp_path / "nt.jsonl")
    with pytest.raises(DataError, match="missing required column 'target'"):
        load_source(no_target)
    extra = write_jsonl([dict(r, foo=1) for r in rows], tmp_path / "extra.jsonl")
    with pytest.raises(DataError, match="unknown column 'foo'"):
        load_source(extra)
    assert load_source(extra, allow_extra_columns=True).extra_columns == ["foo"]
    renamed = write_jsonl(
        [{("response" if k == "target" else k): v for k, v in r.items()} for r in rows], tmp_path / "rn.jsonl"
    )
    with pytest.raises(DataError, match="'trace'"):
        load_source(renamed, field_map={"target": "trace"})
    with pytest.raises(DataError, match="field_map key 'solution'"):
        load_source(renamed, field_map={"solution": "response"})
    loaded = load_source(renamed, field_map={"target": "response"})
    assert loaded.rows[0]["target"] == rows[0]["target"] and "response" not in loaded.columns
    with pytest.raises(DataError, match="exceeds the 5 valid rows"):
        split_dataset(renamed, tmp_path / "o", n_sft=5, field_map={"target": "response"}, progress=False)
    with pytest.raises(DataError, match="think_prefix mode 'drop'"):
        split_dataset(renamed, tmp_path / "o", n_sft=1, think_prefix="drop", progress=False)


def test_parquet_and_jsonl_inputs_split_identically(tmp_path, tiny_data):
    rows = _source_rows(tiny_data["train"])
    j = write_jsonl(rows, tmp_path / "same.jsonl")
    a = split_dataset(tiny_data["train"], tmp_path / "a", n_sft=40, seed=3, progress=False)
    b = split_dataset(j, tmp_path / "b", n_sft=40, seed=3, progress=False)
    assert a.sft_ids == b.sft_ids
    assert _sha(tmp_path / "a" / "sft_train.parquet") == _sha(tmp_path / "b" / "sft_train.parquet")


def test_think_prefix_modes(tmp_path):
    src_rows = _source_rows(SAMPLE)
    no_think = copy.deepcopy(src_rows[0])
    no_think["prompt"][1]["content"] = "A problem whose trace has no think tag."
    no_think["target"][0]["content"] = "Direct answer \\boxed{1}"
    src = write_jsonl(src_rows + [no_think], tmp_path / "in.jsonl")
    traces = {i: r["target"][0]["content"] for i, r in enumerate(src_rows + [no_think])}
    results = {}
    for mode in ("keep", "prompt", "strip"):
        rep = split_dataset(src, tmp_path / mode, n_sft=8, seed=0, think_prefix=mode, progress=False)
        sft = pq.read_table(tmp_path / mode / "sft_train.parquet").to_pylist()
        results[mode] = (rep, {r["id"]: r["messages"][-1]["content"] for r in sft})
        assert read_split_report(tmp_path / mode)["think_prefix"] == mode
    rep, contents = results["keep"]
    assert rep.generation_prefix == "" and rep.n_valid == 25
    assert all(contents[i] == traces[i] for i in contents)
    rep, contents = results["prompt"]
    assert rep.generation_prefix == "<think>\n" and rep.dropped["missing_think_prefix"] == 1 and rep.n_valid == 24
    assert read_split_report(tmp_path / "prompt")["generation_prefix"] == "<think>\n"
    assert all("<think>\n" + contents[i] == traces[i] for i in contents)
    rep, contents = results["strip"]
    assert rep.generation_prefix == "" and rep.n_valid == 25
    for i, c in contents.items():
        assert not c.startswith("<think>")
        assert c == (traces[i].removeprefix("<think>\n") if traces[i].startswith("<think>\n") else traces[i])
        assert ("</think>" in c) == ("</think>" in traces[i])


def test_length_filter_and_token_stats(tmp_path, tokenizer):
    rows = _source_rows(SAMPLE)
    # independent length: the hand-rendered ChatML conversation, tokenized
    lengths = [
        len(tokenizer(render_chatml(r["prompt"] + r["target"]), add_special_tokens=False)["input_ids"]) for r in rows
    ]
    prompt_lengths = [
        len(tokenizer(render_chatml(r["prompt"], add_generation_prompt=True), add_special_tokens=False)["input_ids"])
        for r in rows
    ]
    cutoff = sorted(lengths)[16]  # about 7 rows are longer (fewer if lengths tie at the cutoff)
    n_over = sum(n > cutoff for n in lengths)
    assert 0 < n_over < 24 - 4
    rep = split_dataset(SAMPLE, tmp_path, n_sft=4, seed=0, tokenizer=tokenizer, cutoff_tokens=cutoff, progress=False)
    assert rep.dropped["over_length"] == n_over
    assert rep.n_valid == 24 - n_over
    over_idx = [json.loads(line)["index"] for line in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert over_idx == [i for i, n in enumerate(lengths) if n > cutoff]
    assert rep.length_check.startswith("applied: cutoff_tokens=")
    # the departure from the paper's 20,000, measured on these rows: every row fits 20,000, so every drop is the
    # departure's own
    c = rep.cutoff
    assert (c["cutoff_tokens"], c["paper_cutoff_tokens"], c["departs_from_paper"]) == (cutoff, 20000, True)
    assert (c["n_rows_measured"], c["n_over_cutoff"], c["n_dropped_by_departure"]) == (24, n_over, n_over)
    assert c["share_over_cutoff"] == pytest.approx(n_over / 24) and c["length_tokens"]["max"] == max(lengths)
    assert f"drops {n_over} of 24 rows ({100 * n_over / 24:.2f}%)" in c["note"]
    assert json.loads((tmp_path / "split_report.json").read_text())["cutoff"] == c
    kept = {"sft": rep.sft_ids, "rl": rep.rl_ids}
    for split, ids in kept.items():
        st = rep.token_stats[split]
        assert st["prompt_tokens"]["min"] == min(prompt_lengths[i] for i in ids)
        assert st["prompt_tokens"]["max"] == max(prompt_lengths[i] for i in ids)
        assert st["target_tokens"]["max"] == max(lengths[i] - prompt_lengths[i] for i in ids)
        total = [lengths[i] - prompt_lengths[i] for i in ids]
        assert st["target_tokens"]["mean"] == round(sum(total) / len(total), 2)


def test_cutoff_report_by_hand():
    from eksft_pipeline.data.split import cutoff_report

    lengths = [100, 9000, 10240, 10241, 15000, 20000, 20001, 30000]
    c = cutoff_report(lengths, 10240)
    # > 10240: 10241, 15000, 20000, 20001, 30000 = 5; > 20000: 2; the paper's cutoff keeps 10241, 15000, 20000
    assert (c["n_over_cutoff"], c["n_over_paper_cutoff"], c["n_dropped_by_departure"]) == (5, 2, 3)
    assert c["share_over_cutoff"] == 5 / 8 and c["share_dropped_by_departure"] == 3 / 8
    assert c["length_tokens"] == {"p50": 15000, "p90": 30000, "p99": 30000, "max": 30000}
    assert c["note"].startswith("cutoff 10240 tokens departs from the paper's 20000: it drops 5 of 8 rows (62.50%), "
                                "3 of them (37.50%) rows the paper's cutoff keeps")
    same = cutoff_report(lengths, 20000)
    assert not same["departs_from_paper"] and same["n_dropped_by_departure"] == 0 and "departs" not in same["note"]
    # a longer cutoff than the paper's drops fewer rows, none "by the departure"
    assert cutoff_report(lengths, 25000)["n_dropped_by_departure"] == 0
    assert cutoff_report([], 10240)["share_over_cutoff"] == 0.0


def test_default_system_prompt_is_in_samples():
    for r in _source_rows(SAMPLE):
        assert r["prompt"][0] == {"role": "system", "content": SYSTEM_PROMPT}


def test_pandas_written_parquet_with_an_index_column_needs_no_allow_extra_columns(tmp_path):
    import pandas as pd

    rows = to_openr1_rows(generate_problems(12, seed=1))
    keep = [i for i in range(len(rows)) if i % 3]
    df = pd.DataFrame(rows).iloc[keep]  # a filtered frame: pandas stores its index as __index_level_0__
    df.to_parquet(tmp_path / "pd.parquet")
    assert "__index_level_0__" in pq.read_table(tmp_path / "pd.parquet").column_names
    loaded = load_source(tmp_path / "pd.parquet")  # raised "unknown column '__index_level_0__'" before
    assert "__index_level_0__" not in loaded.columns and loaded.extra_columns == []
    assert [r["prompt"][-1]["content"] for r in loaded.rows] == [rows[i]["prompt"][-1]["content"] for i in keep]
    # a genuinely unknown column still raises
    df.assign(foo=1).to_parquet(tmp_path / "pd_foo.parquet")
    with pytest.raises(DataError, match="unknown column 'foo'"):
        load_source(tmp_path / "pd_foo.parquet")
