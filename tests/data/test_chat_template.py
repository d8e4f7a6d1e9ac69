"""One explicit chat template for the run, and the EOS check before SFT (eksft_pipeline/data/chat_template.py).

The failure this fixes, reproduced with Qwen3-8B's own chat template (tests/data/fixtures/, source noted there)
set on the tiny tokenizer, which has the same special tokens (<|im_start|>, <|im_end|>, <|endoftext|>, <think>):
verl 0.9.1's MultiTurnSFTDataset renders each message on its own and asserts that the concatenation equals the
whole conversation -- Qwen3's template moves <think>...</think> out of an assistant turn rendered on its own, so the
assertion fails on the first SFT row, and `ignore_input_ids_mismatch=true` trains on answers whose reasoning was
cut out. The fix: the qwen3-8b recipe names its template (chatml = LLaMA-Factory's qwen3_nothink) and the SFT stage
hands it to verl as `model.custom_chat_template`; verl's own HFModelConfig and SFT dataset, built from the resolved
qwen3-8b SFT config, then render the row with the reasoning inside the loss mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.contract.run_format import resolve_template
from eksft_pipeline.contract.stage_api import StageContext
from eksft_pipeline.data import chat_template as ct
from eksft_pipeline.data.split import split_dataset
from eksft_pipeline.data.synth import generate_problems, to_openr1_rows
from eksft_pipeline.models.tiny import save_generation_config, tiny_config
from eksft_pipeline.models.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer, render_chatml

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "samples" / "openr1_math_sample.jsonl"
QWEN3_TEMPLATE = (Path(__file__).parent / "fixtures" / "qwen3_8b_chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def corpus():
    rows = to_openr1_rows(generate_problems(300, seed="tok"))
    texts = [render_chatml(r["prompt"] + r["target"]) for r in rows]
    return texts + [json.loads(line)["target"][0]["content"] for line in SAMPLE.read_text().splitlines()]


def _qwen_like_dir(root: Path, corpus, *, template: str, eos: str) -> Path:
    """A model directory whose tokenizer/config mimic a Qwen3 release: chat template, EOS, generation_config."""
    from eksft_pipeline.models.tokenizer import save_tokenizer

    tok = build_tiny_tokenizer(None, corpus, vocab_size=512)
    tok.chat_template = template
    tok.eos_token = eos
    root.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, root)
    config = tiny_config(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(root)  # no weights: verl's HFModelConfig reads config, tokenizer, generation config
    save_generation_config(root, tok)  # eos_token_id = the tokenizer's EOS, as Qwen3 / Qwen3-Base ship it
    return root


@pytest.fixture(scope="module")
def qwen3_8b_dir(tmp_path_factory, corpus):
    """Stands in for Qwen/Qwen3-8B: Qwen3's own template, EOS <|im_end|>."""
    return _qwen_like_dir(tmp_path_factory.mktemp("qwen3-8b"), corpus, template=QWEN3_TEMPLATE, eos="<|im_end|>")


@pytest.fixture(scope="module")
def qwen3_8b_base_dir(tmp_path_factory, corpus):
    """Stands in for Qwen/Qwen3-8B-Base: EOS <|endoftext|> in tokenizer and generation_config."""
    return _qwen_like_dir(tmp_path_factory.mktemp("qwen3-8b-base"), corpus, template=QWEN3_TEMPLATE,
                          eos="<|endoftext|>")  # fmt: skip


@pytest.fixture(scope="module")
def sft_parquet(tmp_path_factory, qwen3_8b_dir):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("split")
    split_dataset(SAMPLE, out, n_sft=4, seed=0, tokenizer=AutoTokenizer.from_pretrained(qwen3_8b_dir), progress=False)
    return out / "sft_train.parquet"


def _multiturn(parquet: Path, tokenizer, **extra):
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    cfg = {"messages_key": "messages", "max_length": 4096, "truncation": "error", "pad_mode": "no_padding", **extra}
    return MultiTurnSFTDataset(str(parquet), tokenizer, cfg)


def test_chatml_is_the_tiny_template_and_qwen3_nothink_rendering():
    assert ct.CHATML == CHAT_TEMPLATE  # the CPU default already renders exactly what the GPU recipes render
    assert resolve_template("chatml") == ct.CHATML and resolve_template(None) is None
    assert resolve_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ct.ChatTemplateError, match="chatml"):
        resolve_template("qwen3_nothinking")


def test_qwen3_own_template_breaks_verl_multiturn_sft_dataset(monkeypatch, qwen3_8b_dir, sft_parquet):
    """The failure: verl's per-turn rendering + Qwen3's template -> AssertionError, or the reasoning cut out."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(qwen3_8b_dir)
    assert tok.chat_template == QWEN3_TEMPLATE
    with pytest.raises(AssertionError, match="apply_chat_template to each turn separately"):
        _multiturn(sft_parquet, tok)[0]
    # verl's escape hatch trains on the per-turn concatenation: the assistant turn without its reasoning
    ds = _multiturn(sft_parquet, tok, ignore_input_ids_mismatch=True)
    item = ds[0]
    trained = tok.decode(item["input_ids"][item["loss_mask"].bool()])
    reasoning = pq.read_table(sft_parquet).to_pylist()[0]["messages"][-1]["content"].split("</think>")[0]
    assert "<think>" not in trained and reasoning.split("\n")[1] not in trained


def test_resolved_qwen3_8b_sft_config_renders_the_reasoning_inside_the_loss(monkeypatch, tmp_path, qwen3_8b_dir,
                                                                             sft_parquet):
    """The fix, through verl's own code: HFModelConfig (custom_chat_template) + create_sft_dataset."""
    from verl.trainer.sft_trainer import create_sft_dataset
    from verl.utils.config import omega_conf_to_dataclass

    from eksft_pipeline.sft.stage import SFTStage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_pipeline("model=qwen3-8b", "cluster=8gpu")
    stage = SFTStage()
    vc = stage.verl_config(StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key="sft/eksft",
                                        dry_run=True))  # fmt: skip
    assert vc.model.custom_chat_template == ct.CHATML
    vc.model.path = str(qwen3_8b_dir)  # the released model's tokenizer, Qwen3's template included
    vc.model.override_config.attn_implementation = "sdpa"
    model_config = omega_conf_to_dataclass(vc.model)
    tok = model_config.tokenizer
    assert tok.chat_template == ct.CHATML  # set by verl from model.custom_chat_template
    ds = create_sft_dataset([str(sft_parquet)], vc.data, tok, model_config.processor)
    rows = pq.read_table(sft_parquet).to_pylist()
    for k, row in enumerate(rows):
        item = ds[k]
        ids, loss = item["input_ids"], item["loss_mask"].bool()
        system, user, assistant = row["messages"]
        assert tok.decode(ids) == (f"<|im_start|>system\n{system['content']}<|im_end|>\n"
                                   f"<|im_start|>user\n{user['content']}<|im_end|>\n"
                                   f"<|im_start|>assistant\n{assistant['content']}<|im_end|>\n")  # fmt: skip
        trained = tok.decode(ids[loss])
        # the whole assistant turn, reasoning first, is trained on, and it ends with the EOS RL/eval stop on
        assert assistant["content"].startswith("<think>\n") and "</think>" in assistant["content"]
        assert trained == assistant["content"] + "<|im_end|>\n"
        pos = torch.nonzero(loss).flatten()
        assert int(pos[-1] - pos[0]) + 1 == len(pos)  # one contiguous span
        eos_pos = int(pos[-1]) - 1  # <|im_end|>, followed by the template's "\n"
        assert int(ids[eos_pos]) == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


def _split_ctx(tmp_path: Path, *overrides: str) -> StageContext:
    cfg = compose_pipeline("stage=split", "cluster=cpu", f"split.source={SAMPLE}", "model.data.n_sft=8", *overrides)
    return StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key="split")


def test_split_refuses_a_base_model_whose_eos_is_not_the_turn_end(monkeypatch, tmp_path, qwen3_8b_base_dir):
    """Qwen3-8B-Base ships <|endoftext|> as EOS; ChatML turns end with <|im_end|>: refused at the split, not after SFT."""
    from eksft_pipeline.data.stage import SplitStage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = _split_ctx(tmp_path / "bad", "model=qwen3-8b-base", f"model.path={qwen3_8b_base_dir}", "model.eos_token=null")
    with pytest.raises(ct.ChatTemplateError, match=r"EOS mismatch.*model\.eos_token: '<\|im_end\|>'"):
        SplitStage().run(ctx)
    assert not (tmp_path / "bad" / "split" / "sft_train.parquet").exists()  # nothing split, nothing trained


def test_split_writes_the_run_tokenizer_with_template_and_eos(monkeypatch, tmp_path, qwen3_8b_base_dir):
    """The base recipe declares <|im_end|> as EOS: the split checks it and writes the tokenizer SFT trains with."""
    from transformers import AutoTokenizer

    from eksft_pipeline.data.stage import SplitStage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = _split_ctx(tmp_path, "model=qwen3-8b-base", f"model.path={qwen3_8b_base_dir}")
    res = SplitStage().run(ctx)
    tok = AutoTokenizer.from_pretrained(res.outputs["tokenizer"])
    assert tok.chat_template == ct.CHATML and tok.eos_token == "<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert res.summary["eos"]["end_of_turn_id"] == im_end and im_end in res.summary["eos"]["stop_token_ids"]
    # the base model's own <|endoftext|> (generation_config.json) stays a stop token too
    assert tok.convert_tokens_to_ids("<|endoftext|>") in res.summary["eos"]["stop_token_ids"]
    # the SFT stage trains with exactly this tokenizer and template (verl: model.tokenizer_path, custom_chat_template)
    from eksft_pipeline.sft.stage import SFTStage

    ctx.manifest.start("split", {}, "h", {})
    ctx.manifest.complete("split", res.outputs, res.summary)
    cfg = ctx.cfg
    sft = SFTStage()
    vc = sft.verl_config(StageContext(cfg=cfg, run_dir=tmp_path, manifest=ctx.manifest, key="sft/eksft"))
    assert vc.model.tokenizer_path == res.outputs["tokenizer"] and vc.model.custom_chat_template == ct.CHATML
