"""The tiny RL assets and the DAPO command line shared by tests/rl/test_cpu_ppo.py (the hf_cpu rollout) and
tests/rl/test_vllm_rollout.py (verl's vLLM rollout on CPU): one builder, the model's head count the only difference
(vLLM's CPU attention has no kernel for head_dim 16, so its tests pass ``num_heads=2, num_kv_heads=1``: head_dim 32).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def chat(a: int, b: int, c: int) -> str:
    """One ChatML training text: "What is a + b?" answered with the (not necessarily true) sum c."""
    from eksft_pipeline.data.synth import TINY_SYSTEM_PROMPT
    from eksft_pipeline.models.tokenizer import render_chatml

    return render_chatml(
        [
            {"role": "system", "content": TINY_SYSTEM_PROMPT},
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"<think>\n{a} + {b} = {c}\n</think>\n\nThe answer is \\boxed{{{c}}}."},
        ]
    )


def tiny_texts(max_operand: int) -> list[str]:
    return [chat(a, b, a + b) for a in range(max_operand) for b in range(max_operand)]


def build_model(out: Path, *, vocab_size: int = 300, hidden: int = 64, layers: int = 2, max_operand: int = 5,
                num_heads: int = 4, num_kv_heads: int = 2):
    """A random-weight tiny Qwen3 (intermediate size 2 x hidden) + its BPE tokenizer trained on the "a + b" chats."""
    from eksft_pipeline.models.tiny import build_tiny_model
    from eksft_pipeline.models.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(None, tiny_texts(max_operand), vocab_size=vocab_size)
    build_tiny_model(out, tok, hidden_size=hidden, num_layers=layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     intermediate_size=2 * hidden)  # fmt: skip
    return tok


def rl_assets(root: Path, texts: list[str], steps: int, train: list[tuple], val: list[tuple],
              **heads) -> dict[str, Path]:
    """Tiny Qwen3 pre-trained for `steps` steps on `texts`, + train/val RL parquet of (a, b, answer) prompts;
    `heads`: build_model's num_heads / num_kv_heads."""
    from eksft_pipeline.data.schema import RL_SCHEMA
    from eksft_pipeline.data.synth import to_rl_eval_rows, write_parquet
    from eksft_pipeline.models.pretrain import pretrain_tiny

    model = root / "model"
    build_model(model, max_operand=5, **heads)
    pretrain_tiny(model, texts, steps=steps, seq_len=64, batch_size=16, lr=3e-3, warmup_steps=10,
                  progress=False, num_threads=1)  # fmt: skip

    def rows(items):
        probs = [{"data_source": "tiny_add", "problem": f"What is {x} + {y}?", "answer": str(c)} for x, y, c in items]
        return to_rl_eval_rows(probs)

    return {
        "model": model,
        "train": write_parquet(rows(train), root / "train.parquet", RL_SCHEMA),
        "val": write_parquet(rows(val), root / "val.parquet", RL_SCHEMA),
    }


def make_rl_assets(root: Path, **heads) -> dict[str, Path]:
    """Tiny Qwen3 briefly pre-trained on "a + b" chats (a, b < 5) + train/val parquet of those prompts.

    ~150 steps teach the format (\\boxed{digit}) but not the sums, so groups of 4 samples mix right and wrong
    answers (what DAPO's dynamic sampling keeps).
    """
    probs = [(a, b, a + b) for a in range(5) for b in range(5)] * 2
    random.Random(0).shuffle(probs)
    return rl_assets(root, tiny_texts(5) * 4, 150, train=probs, val=probs[:8], **heads)


def dapo_cmd(assets: dict[str, Path], *extra: str, python: str = sys.executable, platform: str = "cpu") -> list[str]:
    """`python -m eksft_pipeline.verl_ext.ppo_main` on the CPU DAPO recipe with the test's model and data
    (`platform`: cpu = the hf_cpu rollout, cpu_vllm = verl's vLLM rollout on vLLM's CPU build)."""
    return [
        python, "-m", "eksft_pipeline.verl_ext.ppo_main",
        "--config-path", str(REPO / "recipes" / "verl"), "--config-name", "dapo", f"dapo_platform={platform}",
        f"actor_rollout_ref.model.path={assets['model']}",
        f"data.train_files={assets['train']}", f"data.val_files={assets['val']}",
        *extra,
    ]  # fmt: skip


def run_dapo(cmd: list[str], cwd: Path, metrics_file: Path, *, steps: int, timeout_s: float = 480):
    """Run main_ppo with the CPU shim's environment; returns (rc, output tail, {event: seconds}, total seconds)."""
    from eksft_pipeline.verl_ext.cpu_platform import cpu_env

    env = {**os.environ, **cpu_env(), "OMP_NUM_THREADS": "1", "VERL_FILE_LOGGER_PATH": str(metrics_file)}
    needles = [("ready", "all initialize finished")] + [(f"step{k}", f" step:{k} ") for k in range(1, steps + 1)]
    marks: dict[str, float] = {}
    lines: list[str] = []
    t_run = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout_s, proc.kill)  # a hung Ray placement must fail the test, not block CI
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            now = time.perf_counter() - t_run
            for key, needle in needles:
                if needle in line and key not in marks:
                    marks[key] = now
        rc = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    return rc, "".join(lines[-60:]), marks, time.perf_counter() - t_run


# the learning-signal task

EASY_ANSWER = 4
EASY_PAIRS = [(a, EASY_ANSWER - a) for a in range(EASY_ANSWER + 1)]  # 0+4, 1+3, 2+2, 3+1, 4+0
EASY_GUESSES = (2, 3, 4, 5, 6)  # pre-training answers every question with each of these equally often


def make_easy_rl_assets(root: Path, **heads) -> dict[str, Path]:
    """An easy RL task whose starting accuracy is known: about 1/len(EASY_GUESSES) = 0.2.

    The tiny Qwen3 is pre-trained on "What is a + b?" chats (a, b < 5) whose answer is, for every question,
    each of EASY_GUESSES once: it learns the format and that the answer is one of five digits, but nothing ties
    the digit to the question. The RL prompts all have the sum EASY_ANSWER (one of the five), so the only thing
    RL has to learn is to prefer that digit: a policy-gradient signal that shows up within a few steps if (and
    only if) rewards, advantages, the clipped loss, the optimizer and the weight sync to the rollout all work.
    """
    texts = [chat(a, b, c) for a in range(5) for b in range(5) for c in EASY_GUESSES]
    probs = [(a, b, EASY_ANSWER) for a, b in EASY_PAIRS]
    train = probs * 4
    random.Random(0).shuffle(train)
    return rl_assets(root, texts * 2, 400, train=train, val=probs, **heads)
