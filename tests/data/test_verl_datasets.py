"""verl 0.9.1 reads the split outputs: MultiTurnSFTDataset loss mask = assistant tokens, RLHFDataset prompts."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from eksft_pipeline.data.split import split_dataset
from eksft_pipeline.data.synth import generate_problems, to_openr1_rows
from eksft_pipeline.models.tokenizer import build_tiny_tokenizer, render_chatml

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "samples" / "openr1_math_sample.jsonl"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rows = to_openr1_rows(generate_problems(300, seed="tok"))
    corpus = [render_chatml(r["prompt"] + r["target"]) for r in rows]
    corpus += [json.loads(line)["target"][0]["content"] for line in SAMPLE.read_text().splitlines()]
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), corpus, vocab_size=512)


@pytest.mark.parametrize("mode", ["keep", "prompt"])
def test_multiturn_sft_dataset_loss_mask_is_the_assistant_turn(tmp_path, tokenizer, monkeypatch, mode):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    rep = split_dataset(SAMPLE, tmp_path, n_sft=8, seed=0, tokenizer=tokenizer, think_prefix=mode, progress=False)
    kwargs = {"generation_prefix": rep.generation_prefix} if rep.generation_prefix else {}
    ds = MultiTurnSFTDataset(
        str(tmp_path / "sft_train.parquet"),
        tokenizer,
        {
            "messages_key": "messages",
            "max_length": 1024,
            "truncation": "error",
            "pad_mode": "right",
            "apply_chat_template_kwargs": kwargs,
        },
    )
    rows = pq.read_table(tmp_path / "sft_train.parquet").to_pylist()
    assert len(ds) == len(rows) == 8
    gen_prompt = "<|im_start|>assistant\n" + rep.generation_prefix
    for k, row in enumerate(rows):
        item = ds[k]
        ids, loss, attn = item["input_ids"], item["loss_mask"], item["attention_mask"]
        n = int(attn.sum())
        assert bool(attn[:n].all()) and not bool(attn[n:].any())  # right padding
        system, user, assistant = row["messages"]
        # hand-written ChatML, not the template: the whole unpadded sequence
        expected = (
            f"<|im_start|>system\n{system['content']}<|im_end|>\n"
            f"<|im_start|>user\n{user['content']}<|im_end|>\n"
            f"{gen_prompt}{assistant['content']}<|im_end|>\n"
        )
        assert tokenizer.decode(ids[:n]) == expected
        # the loss covers a contiguous suffix: the assistant content, <|im_end|> and the template's "\n"
        pos = torch.nonzero(loss).flatten()
        assert int(pos[-1]) == n - 1 and int(pos[-1] - pos[0]) + 1 == len(pos)
        assert tokenizer.decode(ids[loss.bool()]) == assistant["content"] + "<|im_end|>\n"
        assert tokenizer.decode(ids[: int(pos[0])]).endswith(gen_prompt)
        assert not bool(loss[n:].any())
        if mode == "prompt":
            assert not assistant["content"].startswith("<think>") and "<think>" in tokenizer.decode(ids[:n])


def test_rlhf_dataset_reads_rl_parquet(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from verl.utils.dataset.rl_dataset import RLHFDataset

    rep = split_dataset(SAMPLE, tmp_path, n_sft=8, seed=0, tokenizer=tokenizer, progress=False)
    ds = RLHFDataset(
        str(tmp_path / "rl_train.parquet"),
        tokenizer,
        {
            "prompt_key": "prompt",
            "max_prompt_length": 2048,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "cache_dir": str(tmp_path / "cache"),
        },
    )
    assert len(ds) == rep.n_rl == 16
    src = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    for k in range(len(ds)):
        item = ds[k]
        orig = src[rep.rl_ids[k]]
        assert item["index"] == rep.rl_ids[k]
        assert item["raw_prompt"] == orig["prompt"]
        assert item["reward_model"]["ground_truth"] == orig["reward_model"]["ground_truth"]
        assert item["data_source"] == orig["data_source"]
