"""Tiny Qwen3 + tokenizer: chat template, special tokens, digits, offline loading, size, pretraining, assets."""

import json
import os
import subprocess
import sys

import pytest

from eksft_pipeline.data.synth import generate_problems, pretrain_text, to_openr1_rows
from eksft_pipeline.data.tiny_assets import make_tiny_assets
from eksft_pipeline.models.pretrain import pretrain_tiny
from eksft_pipeline.models.tiny import build_tiny_model, count_parameters
from eksft_pipeline.models.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, render_chatml


def _corpus(n=300, seed="tok"):
    rows = to_openr1_rows(generate_problems(n, seed=seed))
    return [render_chatml(r["prompt"] + r["target"]) for r in rows]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d, _corpus(), vocab_size=512)
    return d


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


CONV = [
    {"role": "system", "content": "Think step by step."},
    {"role": "user", "content": "What is $47 + 38$?"},
    {"role": "assistant", "content": "<think>\nOnes: 7 + 8 = 15.\n</think>\n\nThe answer is \\boxed{85}."},
]


def test_chat_template_renders_chatml_and_roundtrips(tokenizer):
    text = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert text == (
        "<|im_start|>system\nThink step by step.<|im_end|>\n"
        "<|im_start|>user\nWhat is $47 + 38$?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nOnes: 7 + 8 = 15.\n</think>\n\nThe answer is \\boxed{85}.<|im_end|>\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    gen = tokenizer.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert gen == text[: text.index("<|im_start|>assistant\n")] + "<|im_start|>assistant\n"
    gen_think = tokenizer.apply_chat_template(
        CONV[:2], tokenize=False, add_generation_prompt=True, generation_prefix="<think>\n"
    )
    assert gen_think == gen + "<think>\n"
    # no BOS / default system prompt is injected
    assert (
        tokenizer.apply_chat_template(CONV[1:2], tokenize=False) == "<|im_start|>user\nWhat is $47 + 38$?<|im_end|>\n"
    )


def test_special_tokens_are_single_and_eos_is_im_end(tokenizer):
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tokenizer(s, add_special_tokens=False)["input_ids"] == [i]
        assert tokenizer(f"a{s}b", add_special_tokens=False)["input_ids"].count(i) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    ids = tokenizer("<think>\nx\n</think>\n\n<|im_end|>", add_special_tokens=False)["input_ids"]
    # <think> tags survive skip_special_tokens (reward/format checks see them); <|im_end|> does not
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>\n\n"
    assert (
        tokenizer("hello", add_special_tokens=True)["input_ids"]
        == tokenizer("hello", add_special_tokens=False)["input_ids"]
    )


def test_digits_are_single_tokens(tokenizer):
    for number in ("7", "85", "1275", "9081726354"):
        toks = tokenizer.convert_ids_to_tokens(tokenizer(number, add_special_tokens=False)["input_ids"])
        assert toks == list(number)
    ids = tokenizer("x = 135 / 9", add_special_tokens=False)["input_ids"]
    assert [t for t in tokenizer.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)] == ["1", "3", "5", "9"]


def test_tokenizer_is_deterministic(tmp_path, tok_dir):
    build_tiny_tokenizer(tmp_path, _corpus(), vocab_size=512)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(None, ["abc"], vocab_size=100)


def test_traces_are_short(tokenizer):
    rows = to_openr1_rows(generate_problems(400, seed=9))
    lengths = [len(tokenizer(r["target"][0]["content"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert max(lengths) <= 150


def _expected_params(v, h, n_layers, n_heads, n_kv, inter):
    hd = h // n_heads
    attn = h * n_heads * hd + 2 * h * n_kv * hd + n_heads * hd * h + 2 * hd  # q,k,v,o + q_norm,k_norm
    mlp = 3 * h * inter
    return v * h + n_layers * (attn + mlp + 2 * h) + h  # tied embedding, 2 norms per layer, final norm


def test_model_builds_loads_offline_and_generates(tmp_path, tokenizer):
    m = build_tiny_model(tmp_path / "m", tokenizer, seed=0)
    v = m.config.vocab_size
    assert v % 64 == 0 and v >= len(tokenizer)
    n = count_parameters(m)
    assert n == _expected_params(v, 128, 4, 4, 2, 384)
    assert 200_000 <= n <= 5_000_000
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["tie_word_embeddings"] is True and cfg["dtype"] == "float32"
    assert cfg["max_position_embeddings"] >= 2048
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 0)
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"] == 2
    # a fresh process with the hub switched off loads model + tokenizer from the folder and generates
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "d = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(d); m = AutoModelForCausalLM.from_pretrained(d)\n"
        "assert m.config._attn_implementation == 'sdpa', m.config._attn_implementation\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is $2 + 3$?'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "print(sum(p.numel() for p in m.parameters()), out.shape[1] - ids.shape[1])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    n_loaded, n_new = map(int, res.stdout.split()[-2:])
    assert n_loaded == n and 1 <= n_new <= 5


def test_pretraining_lowers_the_loss(tmp_path, tokenizer):
    build_tiny_model(
        tmp_path, tokenizer, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, seed=0
    )
    texts = [pretrain_text(p) for p in generate_problems(300, seed="pre")]
    before = (tmp_path / "model.safetensors").read_bytes()
    log = pretrain_tiny(
        tmp_path, texts, steps=40, seq_len=64, batch_size=8, lr=3e-3, warmup_steps=5, seed=0, progress=False
    )
    assert log["steps_done"] == 40 and log["stopped_by"] == "steps"
    assert log["first_loss"] > 5.0  # ~ln(vocab) at random init
    assert log["last_loss"] < log["first_loss"] - 2.0
    assert (tmp_path / "model.safetensors").read_bytes() != before
    assert json.loads((tmp_path / "pretrain_log.json").read_text())["steps_done"] == 40
    stopped = pretrain_tiny(tmp_path, texts, steps=40, seq_len=64, batch_size=8, time_budget_s=0.0, progress=False)
    assert stopped["stopped_by"] == "time_budget" and stopped["steps_done"] == 0


def test_make_tiny_assets_idempotent_and_repairs(tmp_path, capsys):
    kw = dict(n_problems=150, n_eval_per_source=4, n_pretrain=60, pretrain_steps=3, seed=0)
    paths = make_tiny_assets(tmp_path, **kw)
    marker = json.loads(paths["marker"].read_text())
    assert set(marker["sha256"]) >= {"data/tiny_math_train.parquet", "model/model.safetensors", "model/tokenizer.json"}
    weights = paths["model"] / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    capsys.readouterr()
    make_tiny_assets(tmp_path, **kw)
    assert "skipping" in capsys.readouterr().out and weights.stat().st_mtime_ns == mtime
    # a half-written build (truncated weights) is detected by the hashes and rebuilt from scratch
    weights.write_bytes(weights.read_bytes()[:100])
    make_tiny_assets(tmp_path, **kw)
    assert "building" in capsys.readouterr().out
    assert (
        json.loads(paths["marker"].read_text())["sha256"]["data/tiny_math_train.parquet"]
        == marker["sha256"]["data/tiny_math_train.parquet"]
    )
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(paths["model"]))
    # other parameters -> rebuild; data for another n_problems differs
    make_tiny_assets(tmp_path, **dict(kw, n_problems=160))
    assert "building" in capsys.readouterr().out


def test_two_processes_building_the_same_assets_build_them_once(tmp_path):
    """Two runs started together on a fresh machine (or two test workers) must not delete each other's files: one
    builds under the folder's lock, the other waits and then finds the complete marker. The test holds the lock
    until both processes wait on it, so the race is the same on a fast and on a busy machine."""
    import fcntl
    import os
    import subprocess
    import sys

    from eksft_pipeline.contract.manifest import sha256_file

    out = tmp_path / "tiny"
    code = ("import sys; from eksft_pipeline.data.tiny_assets import make_tiny_assets; "
            "make_tiny_assets(sys.argv[1], n_problems=150, n_eval_per_source=4, n_pretrain=60, pretrain_steps=5)")
    held = open(str(out) + ".lock", "a")  # the lock file make_tiny_assets takes
    fcntl.flock(held, fcntl.LOCK_EX)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}) for _ in range(2)]  # fmt: skip
    heads = []
    for p in procs:  # each says it waits before the test lets go of the lock
        lines = []
        for line in p.stdout:
            lines.append(line)
            if "waiting for it" in line:
                break
        heads.append("".join(lines))
    assert all("waiting for it" in h for h in heads), heads
    held.close()
    logs = [h + p.communicate(timeout=600)[0] for h, p in zip(heads, procs)]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("building assets" in log for log in logs) == 1, logs
    assert sum("built by the process this one waited for" in log for log in logs) == 1, logs
    marker = json.loads((out / "TINY_ASSETS_COMPLETE.json").read_text())
    assert all(sha256_file(out / rel) == h for rel, h in marker["sha256"].items())
