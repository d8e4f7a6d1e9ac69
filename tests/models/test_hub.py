"""Pinned revisions (eksft_pipeline/models/hub.py): `owner/name@rev` / `model.revision` resolve to that revision's
snapshot directory, which every loader then reads, and the commit lands in the manifest. No network: a fake HF cache
(the hub cache's own layout: refs/<rev> -> snapshots/<commit>/) stands in for the hub."""

import json

import pytest

from eksft_pipeline.models.hub import cached_revision, pin_model_revision, resolve_model_dir, split_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "v1").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return snap


def test_split_revision(tmp_path):
    assert split_revision("Qwen/Qwen3-8B@abc123") == ("Qwen/Qwen3-8B", "abc123")
    assert split_revision("Elliott/Openr1-Math-46k-8192@refs/pr/1") == ("Elliott/Openr1-Math-46k-8192", "refs/pr/1")
    assert split_revision("Qwen/Qwen3-8B") == ("Qwen/Qwen3-8B", None)
    local = tmp_path / "m@1"
    local.mkdir()
    assert split_revision(str(local)) == (str(local), None)  # an existing path is never split
    from eksft_pipeline.data.split import _is_hub_name

    assert _is_hub_name("Elliott/Openr1-Math-46k-8192@" + COMMIT)


def test_pinned_model_resolves_to_its_snapshot_and_reaches_the_manifest(hf_cache, tmp_path):
    from eksft_pipeline.contract.manifest import Manifest
    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.orchestrator.runner import run_pipeline

    assert resolve_model_dir("acme/tiny@v1") == hf_cache and cached_revision("acme/tiny", "v1") == COMMIT
    cfg = pin_model_revision(compose_pipeline("model=qwen3-8b", "model.path=acme/tiny@v1"), offline=True)
    assert cfg.model.path == str(hf_cache) and cfg.model.revision_resolved == COMMIT and cfg.model.hub_name == "acme/tiny"
    cfg = pin_model_revision(compose_pipeline("model=qwen3-8b", "model.path=acme/tiny", "model.revision=v1"),
                             offline=True)
    assert cfg.model.path == str(hf_cache) and cfg.model.revision == "v1"
    # unpinned: passed on unchanged (the loaders take the hub's head; the card says unpinned)
    assert pin_model_revision(compose_pipeline("model=qwen3-8b"), offline=True).model.path == "Qwen/Qwen3-8B"
    # a revision that is not cached, offline: one line naming the download command
    with pytest.raises(ValueError, match=r"hf download acme/tiny --revision v2\)$"):
        pin_model_revision(compose_pipeline("model=qwen3-8b", "model.path=acme/tiny@v2"), offline=True)
    run = tmp_path / "run"
    run_pipeline(compose_pipeline("stage=assets", "model=qwen3-8b", "model.path=acme/tiny@v1", f"run_dir={run}"))
    s = Manifest(run).read()["stages"]["assets"]["summary"]
    assert s["revision_resolved"] == COMMIT and s["revision"] == "v1" and s["hub_name"] == "acme/tiny"
    assert s["model"] == str(hf_cache)


def test_pinned_dataset_source_reaches_datasets(monkeypatch):
    """split.source=owner/name@rev: datasets.load_dataset gets the name and the revision; the split records it."""
    import datasets

    from eksft_pipeline.data.split import load_source

    seen = {}

    def fake_load_dataset(name, split, revision=None):
        seen.update(name=name, split=split, revision=revision)
        return datasets.Dataset.from_list([{"data_source": "d", "prompt": [{"role": "user", "content": "p"}],
                                            "target": [{"role": "assistant", "content": "t"}],
                                            "reward_model": {"ground_truth": "1", "style": "rule"}}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_source(f"acme/math@{COMMIT}", allow_extra_columns=True)
    assert seen == {"name": "acme/math", "split": "train", "revision": COMMIT}
    assert loaded.files == [f"hf://acme/math@{COMMIT}[train]"]  # not cached: the revision asked (a commit here)
