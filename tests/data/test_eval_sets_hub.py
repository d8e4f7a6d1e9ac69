"""Eval sets named as hub datasets (recipes/benchmarks/paper_hub.yaml), read through `datasets` from local files in
the hub layouts: a repository folder of parquet shards, and jsonl with other field names. No network: every hub.id
here is a local path built from the shared AIME/AMC prompts."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from eksft_pipeline.data.eval_sets import load_eval_parquet, load_eval_sets, specs_from_benchmarks
from eksft_pipeline.data.schema import SYSTEM_PROMPT, DataError


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture
def reference(shared_eval_parquet):
    """The shared parquet's AIME 2024/2025 and AMC problems, read by the verl-layout loader (pyarrow)."""
    return load_eval_parquet(shared_eval_parquet, benchmarks={"aime24": "aime", "aime25": "aime25", "amc": "amc"})


def _hub_folder(root, es, split="train"):
    """A hub repository layout (HuggingFaceH4/aime_2024): data/<split>-00000-of-00001.parquet, id/problem/answer."""
    rows = [{"id": i, "problem": p.question, "solution": "", "answer": p.ground_truth} for i, p in enumerate(es.problems)]
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def _jsonl(path, es, q="Question", a="Answer"):
    """jsonl with other field names and float answers (AMC copies store 27.0)."""
    path.write_text("".join(json.dumps({q: p.question, a: float(p.ground_truth)}) + "\n" for p in es.problems))
    return path


def _paper_hub(**ids):
    from eksft_pipeline.contract.recipes import compose_pipeline

    cfg = compose_pipeline("model=qwen3-8b", "benchmarks@model.eval.benchmarks=paper_hub")
    bench = OmegaConf.to_container(cfg.eval.benchmarks, resolve=True)
    for name, hub in ids.items():
        bench[name]["hub"].update(hub)
    return bench


def test_paper_hub_recipe_loads_local_hub_layouts_with_the_expected_counts(tmp_path, reference):
    aime24 = _hub_folder(tmp_path / "aime_2024", reference["aime24"])
    aime25 = _hub_folder(tmp_path / "aime_2025", reference["aime25"], split="test")
    amc = _jsonl(tmp_path / "amc.jsonl", reference["amc"])
    bench = _paper_hub(aime24={"id": str(aime24)}, aime25={"id": str(aime25), "split": "test"}, amc={"id": str(amc)})
    bench.pop("hmmt25")
    bench["amc"] |= {"question_field": "Question", "answer_field": "Answer"}
    sets = load_eval_sets(specs_from_benchmarks(bench))
    assert {b: len(s) for b, s in sets.items()} == {"aime24": 30, "aime25": 30, "amc": 83}
    for name, es in sets.items():
        ref = reference[name]
        assert [p.question for p in es.problems] == [p.question for p in ref.problems]
        if name == "amc":  # stored as floats in the jsonl copy
            assert [float(p.ground_truth) for p in es.problems] == [float(p.ground_truth) for p in ref.problems]
        else:
            assert [p.ground_truth for p in es.problems] == [p.ground_truth for p in ref.problems]
        assert es.problems[0].messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert es.problems[0].data_source == bench[name]["data_source"]
    # an integral float answer reads as the integer (27.0 -> "27"), not "27.0"
    assert all("." not in p.ground_truth for p in sets["amc"].problems)
    # provenance: a local file's content hash (checked against hashlib), the split read
    digest = hashlib.sha256(amc.read_bytes()).hexdigest()
    assert sets["amc"].summary()["content_hash"] == f"sha256:{digest}"
    assert sets["aime25"].summary()["split"] == "test" and "revision_resolved" not in sets["aime25"].summary()


def test_wrong_count_is_a_one_line_error(tmp_path, reference):
    folder = _hub_folder(tmp_path / "aime_2024", reference["aime24"])
    bench = {"aime24": {"hub": {"id": str(folder)}, "n_problems": 31}}
    with pytest.raises(DataError, match=r"^benchmark 'aime24': expected 31 problems \(n_problems\), found 30 in ") as e:
        load_eval_sets(specs_from_benchmarks(bench))
    assert "\n" not in str(e.value)
    # the verl-layout parquet checks its count the same way
    spec = {"path": str(reference["amc"].source), "benchmarks": {"amc": "amc"}, "n_problems": 40}
    with pytest.raises(DataError, match="expected 40 problems .*found 83"):
        load_eval_sets([spec])


def test_hub_entry_errors(tmp_path, reference):
    folder = _hub_folder(tmp_path / "aime_2024", reference["aime24"])
    with pytest.raises(DataError, match="both 'path' and 'hub'"):
        specs_from_benchmarks({"a": {"path": "x.parquet", "hub": {"id": str(folder)}}})
    with pytest.raises(DataError, match=r"unknown key\(s\) \['format'\] for a hub benchmark"):
        specs_from_benchmarks({"a": {"hub": {"id": str(folder)}, "format": "parquet"}})
    with pytest.raises(DataError, match=r"unknown key\(s\) \['revison'\]; allowed"):
        load_eval_sets(specs_from_benchmarks({"a": {"hub": {"id": str(folder), "revison": "main"}}}))
    with pytest.raises(DataError, match="revision='v1' is for hub names"):
        load_eval_sets(specs_from_benchmarks({"a": {"hub": {"id": str(folder), "revision": "v1"}}}))
    with pytest.raises(DataError, match="field 'question' not found in any row"):
        load_eval_sets(specs_from_benchmarks({"a": {"hub": {"id": str(folder)}, "question_field": "question"}}))
    with pytest.raises(DataError, match="not found"):
        load_eval_sets(specs_from_benchmarks({"a": {"hub": {"id": str(tmp_path / "none.parquet")}}}))
    # a split the folder does not have: datasets' error, in one line naming the set
    with pytest.raises(DataError, match=r"^benchmark 'a' hub: cannot load .*split 'test'") as e:
        load_eval_sets(specs_from_benchmarks({"a": {"hub": {"id": str(folder), "split": "test"}}}))
    assert "\n" not in str(e.value)


def test_hub_name_offline_without_cache_is_one_line(monkeypatch):
    """A hub name goes to datasets' hub path; offline and uncached it fails naming the set (never a download)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^benchmark 'aime24' hub: cannot load 'eksft-test/not-a-dataset'"):
        load_eval_sets(specs_from_benchmarks({"aime24": {"hub": {"id": "eksft-test/not-a-dataset", "revision": "v1"}}}))
