"""Eval-set loaders: the shared verl parquet (de-dup counts), jsonl with custom field names, missing answers."""

import json

import pyarrow.parquet as pq
import pytest

from eksft_pipeline.data.eval_sets import (
    load_eval_jsonl,
    load_eval_parquet,
    load_eval_sets,
    write_eval_parquet,
)
from eksft_pipeline.data.schema import RL_SCHEMA, SYSTEM_PROMPT, DataError, prompt_id
from eksft_pipeline.data.synth import to_rl_eval_rows, write_parquet


def test_shared_parquet_counts_after_dedup(shared_eval_parquet):
    SHARED = shared_eval_parquet
    sets = load_eval_parquet(SHARED, benchmarks={"aime24": "aime", "aime25": "aime25", "amc": "amc"})
    assert list(sets) == ["aime24", "aime25", "amc"]
    # the shared README: 30 x 32 copies, 30 x 32, 83 x 32
    assert [len(sets[b]) for b in sets] == [30, 30, 83]
    assert [sets[b].n_rows for b in sets] == [960, 960, 2656]
    assert [sets[b].n_duplicates_removed for b in sets] == [930, 930, 2573]
    assert all(sets[b].n_missing_answer == 0 for b in sets)
    # independent count: distinct user prompts per data_source, straight from pyarrow
    rows = pq.read_table(SHARED, columns=["data_source", "prompt"]).to_pylist()
    for bench, ds in (("aime24", "aime"), ("amc", "amc")):
        distinct = {r["prompt"][-1]["content"] for r in rows if r["data_source"] == ds}
        assert {p.question for p in sets[bench].problems} == distinct
    p = sets["aime24"].problems[0]
    assert p.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}  # the training set's system prompt
    assert p.problem_id == prompt_id(p.question) and len(p.problem_id) == 16
    assert len({q.problem_id for q in sets["amc"].problems}) == 83


def test_shared_parquet_defaults_and_unknown_source(shared_eval_parquet):
    SHARED = shared_eval_parquet
    sets = load_eval_parquet(SHARED)
    assert {b: len(s) for b, s in sets.items()} == {
        "aime24": 30,
        "aime25": 30,
        "amc": 83,
        "math500": 500,
        "minerva": 272,
        "olympiad_bench": 675,
    }
    with pytest.raises(DataError, match="'hmmt'"):
        load_eval_parquet(SHARED, benchmarks={"hmmt25": "hmmt"})


def _hmmt_like(tmp_path, rows):
    p = tmp_path / "hmmt.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_jsonl_custom_fields_dedup_and_missing_answers(tmp_path, capsys):
    rows = [
        {"problem_text": "Compute $1+1$.", "answer_str": "2", "id": 1},
        {"problem_text": "Compute $2+2$.", "answer_str": 4, "id": 2},  # numeric answer -> "4"
        {"problem_text": "Compute $1+1$.", "answer_str": "2", "id": 3},  # duplicate
        {"problem_text": "Compute $3+3$.", "answer_str": "", "id": 4},  # missing answer
        {"problem_text": "Compute $4+4$.", "id": 5},  # missing answer
    ]
    es = load_eval_jsonl(
        _hmmt_like(tmp_path, rows),
        benchmark="hmmt25",
        question_field="problem_text",
        answer_field="answer_str",
        system_prompt="SYS",
    )
    assert [p.question for p in es.problems] == ["Compute $1+1$.", "Compute $2+2$."]
    assert [p.ground_truth for p in es.problems] == ["2", "4"]
    assert es.n_rows == 5 and es.n_duplicates_removed == 1
    assert es.n_missing_answer == 2 and es.missing_answer_rows == [3, 4]
    assert "2 rows without an answer" in capsys.readouterr().out
    assert es.problems[0].messages == (
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Compute $1+1$."},
    )
    assert es.problems[0].data_source == "hmmt25" and es.problems[0].benchmark == "hmmt25"


def test_jsonl_errors(tmp_path):
    p = _hmmt_like(tmp_path, [{"question": "Q", "ref_answer": "1"}])
    with pytest.raises(DataError, match="'answer'"):
        load_eval_jsonl(p, benchmark="x", answer_field="answer")
    with pytest.raises(DataError, match="not found"):
        load_eval_jsonl(tmp_path / "nope.jsonl", benchmark="x")
    conflict = _hmmt_like(tmp_path, [{"question": "Q", "ref_answer": "1"}, {"question": "Q", "ref_answer": "2"}])
    with pytest.raises(DataError, match="different answer"):
        load_eval_jsonl(conflict, benchmark="x")
    es = load_eval_jsonl(_hmmt_like(tmp_path, [{"question": "Q", "ref_answer": "1"}]), benchmark="hmmt25")
    assert es.problems[0].messages[0]["content"] == SYSTEM_PROMPT  # default system prompt = training one


def test_parquet_missing_answers_counted_and_roundtrip(tmp_path):
    probs = [
        {"data_source": "tiny_add", "problem": "What is $1 + 1$?", "answer": "2"},
        {"data_source": "tiny_add", "problem": "What is $1 + 1$?", "answer": "2"},
        {"data_source": "tiny_add", "problem": "What is $1 + 2$?", "answer": ""},
        {"data_source": "tiny_linear", "problem": "Solve $2x = 4$.", "answer": "2"},
    ]
    path = write_parquet(to_rl_eval_rows(probs, system_prompt="S"), tmp_path / "ev.parquet", RL_SCHEMA)
    sets = load_eval_parquet(path, benchmarks={"add": "tiny_add", "lin": "tiny_linear"})
    assert (len(sets["add"]), sets["add"].n_duplicates_removed, sets["add"].n_missing_answer) == (1, 1, 1)
    assert sets["add"].missing_answer_rows == [2] and len(sets["lin"]) == 1
    # the de-duplicated sets written back in verl layout load again to the same problems
    out = write_eval_parquet(sets, tmp_path / "back.parquet")
    again = load_eval_sets([{"path": str(out), "benchmarks": {"add": "add", "lin": "lin"}}])
    assert [p.question for p in again["add"].problems] == [p.question for p in sets["add"].problems]
    assert again["lin"].problems[0].ground_truth == "2"
    with pytest.raises(DataError, match="defined twice"):
        load_eval_sets(
            [{"path": str(out), "benchmarks": {"add": "add"}}, {"path": str(out), "benchmarks": {"add": "lin"}}]
        )


# ------------------------------------------------------------------ eval data never loads silently wrong


def _tiny_parquet(tmp_path, sources=("tiny_add",), answer="2"):
    probs = [{"data_source": ds, "problem": f"What is $1 + {i}$?", "answer": answer} for i, ds in enumerate(sources)]
    return write_parquet(to_rl_eval_rows(probs, system_prompt="S"), tmp_path / "ev.parquet", RL_SCHEMA)


def test_default_mapping_without_a_match_is_an_error_naming_the_values(tmp_path):
    path = _tiny_parquet(tmp_path, sources=("tiny_add", "tiny_linear"))
    with pytest.raises(DataError, match=r"data_source values \['tiny_add', 'tiny_linear'\]"):
        load_eval_parquet(path)  # returned {} before
    no_answers = _tiny_parquet(tmp_path, answer="")
    with pytest.raises(DataError, match="none with an answer"):
        load_eval_parquet(no_answers, benchmarks={"add": "tiny_add"})


def test_a_file_in_the_other_format_is_one_line_naming_file_and_format(tmp_path):
    pq_path = _tiny_parquet(tmp_path)
    jl = tmp_path / "hmmt.jsonl"
    jl.write_text(json.dumps({"question": "Q", "ref_answer": "1"}) + "\n")
    as_jsonl = tmp_path / "really_parquet.jsonl"
    as_jsonl.write_bytes(pq_path.read_bytes())
    with pytest.raises(DataError) as e:
        load_eval_sets([{"path": str(jl), "format": "parquet", "benchmarks": {"h": "h"}}])  # ArrowInvalid before
    msg = str(e.value)
    assert "\n" not in msg and str(jl) in msg and "expected a parquet file" in msg and "set format: jsonl" in msg
    with pytest.raises(DataError) as e:
        load_eval_sets([{"path": str(as_jsonl), "benchmark": "h"}])  # UnicodeDecodeError before
    msg = str(e.value)
    assert "\n" not in msg and str(as_jsonl) in msg and "expected a jsonl file" in msg and "set format: parquet" in msg


def test_unknown_keys_are_errors_listing_the_allowed_ones(tmp_path):
    from eksft_pipeline.data.eval_sets import specs_from_benchmarks

    jl = tmp_path / "h.jsonl"
    jl.write_text(json.dumps({"question": "Q", "ref_answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"unknown key\(s\) \['answer_feild'\].*allowed: .*'answer_field'"):
        specs_from_benchmarks({"hmmt25": {"path": str(jl), "answer_feild": "ref_answer"}})
    with pytest.raises(DataError, match=r"unknown key\(s\) \['question_field'\] for a parquet"):
        specs_from_benchmarks({"amc": {"path": "x.parquet", "question_field": "q"}})
    with pytest.raises(DataError, match=r"unknown key\(s\) \['sytem_prompt'\]"):
        load_eval_sets([{"path": str(jl), "benchmark": "h", "sytem_prompt": "S"}])
    with pytest.raises(DataError, match="unknown format 'csv'"):
        specs_from_benchmarks({"x": {"path": "x.csv"}})


def test_system_prompt_of_a_parquet_benchmark_is_applied(tmp_path):
    from eksft_pipeline.data.eval_sets import specs_from_benchmarks

    path = _tiny_parquet(tmp_path)
    specs = specs_from_benchmarks({"add": {"path": str(path), "data_source": "tiny_add", "system_prompt": "NEW",
                                           "policy": "math"}})
    assert specs == [{"path": str(path), "format": "parquet", "benchmarks": {"add": "tiny_add"}, "system_prompt": "NEW"}]
    es = load_eval_sets(specs)["add"]
    assert es.problems[0].messages[0] == {"role": "system", "content": "NEW"}  # was silently ignored
    kept = load_eval_sets(specs_from_benchmarks({"add": {"path": str(path), "data_source": "tiny_add"}}))["add"]
    assert kept.problems[0].messages[0] == {"role": "system", "content": "S"}
