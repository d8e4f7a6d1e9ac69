"""Stage `export` (eksft_pipeline/export/): trained models as self-contained HF folders with a model card.

The end-to-end check reads the shared tiny run (`tiny_run`, tests/conftest.py: `stage=all`, whose last stage is
export): each folder loads with transformers, generates with the run's EOS, and its card's eval rows are the report's.
The rest are unit tests of the card and the upload (no network: huggingface_hub is replaced)."""

import json

import pytest

from eksft_pipeline.export import card
from eksft_pipeline.export.stage import _override_value, fix_generation_config, repo_for, upload


@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_run_exports_loadable_models_with_cards(complete_tiny_run):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run_dir = complete_tiny_run.run_dir
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["export"]["status"] == "complete", stages.get("export")
    eos = stages["split"]["summary"]["eos"]
    report = (run_dir / "report" / "report.md").read_text().splitlines()
    for kind, label in (("sft", "eksft (SFT)"), ("rl", "eksft (SFT→RL)")):
        folder = run_dir / "export" / f"{kind}-eksft"
        assert stages["export"]["outputs"][f"{kind}-eksft"]["path"] in (str(folder), f"export/{kind}-eksft")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
        gen = GenerationConfig.from_pretrained(folder)
        assert gen.eos_token_id in (eos["end_of_turn_id"], [eos["end_of_turn_id"]])
        # the weights are the trained stage's
        trained = load_file(str(run_dir / f"{kind}/eksft/hf_model/model.safetensors"))
        assert all(torch.equal(model.state_dict()[n], t) for n, t in trained.items() if n in model.state_dict())
        # the run's chat template: the same rendering as the split stage's tokenizer
        run_tok = AutoTokenizer.from_pretrained(run_dir / "split" / "tokenizer")
        msgs = [{"role": "user", "content": "What is 2 + 3?"}]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            run_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        readme = (folder / "README.md").read_text()
        for needle in ("## Base model", "content hash", "## Method", "`eksft`", "## Data", "300 SFT", "## Versions",
                       "- verl: 0.9.1", "## Reproduce", "python -m eksft_pipeline stage=all model=tiny method=eksft"):
            assert needle in readme, (kind, needle)
        rows = [ln for ln in readme.splitlines() if ln.startswith(f"| {label} |")]
        assert {r.split(" | ")[1] for r in rows} == {"tiny_add", "tiny_sub"}, rows
        for r in rows:  # the card's numbers are the report's (its confidence-interval table)
            assert r in report, (r, [ln for ln in report if ln.startswith(f"| {label} |")])


def test_recipe_diff_lists_changed_and_added_leaves():
    recorded = {"seed": 1, "method": "eksft", "sft": {"verl": {"optim": {"lr": 2e-5, "betas": [0.9, 0.95]}}},
                "model": {"path": "m", "extra": {"x": 1}}}
    recipe = {"seed": 1, "method": {"name": "eksft"}, "sft": {"verl": {"optim": {"lr": 1e-5, "betas": [0.9, 0.95]}}},
              "model": {"path": "m"}}
    diff = card.recipe_diff(recorded, recipe)
    assert diff == [("sft.verl.optim.lr", 1e-5, 2e-5), ("model.extra.x", card._MISSING, 1)]
    assert card.recipe_diff(recipe, recipe) == []
    assert [_override_value(v) for v in (None, True, 2e-5, [0.9, 0.95], "a b", "Qwen/Qwen3-8B")] == \
        ["null", "true", "2e-05", "[0.9,0.95]", "'a b'", "Qwen/Qwen3-8B"]


def test_generation_config_gets_the_runs_stop_tokens(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 0}))
    eos = {"stop_token_ids": [2], "stop_tokens": ["<|im_end|>"]}
    notes = fix_generation_config(tmp_path, eos)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": 2, "bos_token_id": 0}
    assert "set by the export (the trainer's folder had 0)" in notes[0]
    assert "set by the export" not in fix_generation_config(tmp_path, eos)[0]  # already right: unchanged


def test_card_eval_rows_use_the_reports_format():
    m = {"benchmarks": {"b": {"n_samples": 8, "avg@n": 0.171875, "pass@k_ci95": {"1": [0.1328125, 0.21875]},
                              "maj@k": {"8": 0.796875}, "n_problems": 32}}}
    assert card.eval_rows("base", m) == ["| base | b | 17.2 | [13.3, 21.9] | 79.7 | 32 |"]


def test_upload_without_credentials_prints_the_command(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("no credentials: no hub call"))
    rec = upload(tmp_path, "me/eksft-tiny-sft-eksft", private=True)
    assert rec["command"] == f"hf upload me/eksft-tiny-sft-eksft {tmp_path} . --private"
    assert rec["command"] in capsys.readouterr().out
    assert repo_for("me/x-{name}", "rl-eksft") == "me/x-rl-eksft" and repo_for("me/x", "rl-eksft") == "me/x-rl-eksft"


def test_upload_with_credentials_uses_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo, private, exist_ok):
            calls.append(("create", repo, private, exist_ok))

        def upload_folder(self, repo_id, folder_path):
            calls.append(("upload", repo_id, folder_path))
            return "https://hub/commit/abc"

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    rec = upload(tmp_path, "me/m", private=False)
    assert calls == [("create", "me/m", False, True), ("upload", "me/m", str(tmp_path))] and rec["uploaded"] == "yes"


def test_export_needs_a_trained_model_and_a_valid_repo_id(tmp_path):
    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.contract.stage_api import ConfigError
    from eksft_pipeline.orchestrator.runner import run_pipeline

    with pytest.raises(ConfigError, match="nothing to export: no complete sft/<method> or rl/<method> stage"):
        run_pipeline(compose_pipeline("stage=export", f"run_dir={tmp_path / 'run'}"))
    with pytest.raises(ConfigError, match="hub.repo_id=noslash is not <owner>/<name>"):
        run_pipeline(compose_pipeline("stage=export", f"run_dir={tmp_path / 'run'}", "hub.repo_id=noslash"))
