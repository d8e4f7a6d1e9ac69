"""Per-GPU memory estimates (eksft_pipeline/verl_ext/memory.py): measured where it can be, enforced before launch.

* the loss head at Qwen3's vocabulary (V = 151,936) is measured on CPU for a few N -- naive and fused, forward +
  backward as the SFT training pass runs them -- and must match `loss_head_peak` within 15 %;
* the dry run prints each stage's estimate and refuses a configuration that cannot fit, naming the knob;
* the 4B / 8B recipes' token budgets come from it (with margin), the reference is kept in bf16, and the RL stall
  guard leaves room for the first DAPO step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.contract.stage_api import StageContext
from eksft_pipeline.losses import get_loss
from eksft_pipeline.verl_ext import memory

REPO = Path(__file__).resolve().parents[2]
GPU_MODELS = ["qwen3-8b", "qwen3-4b", "qwen3-8b-base", "qwen3-4b-base"]


def ctx_for(cfg, tmp_path: Path, key: str) -> StageContext:
    return StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key=key, dry_run=True)


def test_model_shapes_are_the_released_models():
    """Parameter counts of the recipes' shapes = the model cards' (Qwen3-8B 8.2B, Qwen3-4B 4.0B)."""
    for name, billions in (("qwen3-8b", 8.19), ("qwen3-4b", 4.02)):
        cfg = compose_pipeline(f"model={name}", "cluster=8gpu")
        shape = memory.shape_from_model(str(cfg.model.path), dict(cfg.model.arch))
        assert round(shape.n_params / 1e9, 2) == billions, (name, shape.n_params)
    # Qwen3-8B: 36 layers of 4096 + 12288-wide MLP, untied 151,936 x 4096 embedding and head
    s = memory.shape_from_model("Qwen/Qwen3-8B", dict(compose_pipeline("model=qwen3-8b").model.arch))
    assert s.layer_params == 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 128 + 2 * 4096
    assert s.n_params == 36 * s.layer_params + 2 * 151936 * 4096 + 4096


def test_naive_head_terms_by_hand():
    """The naive head's peak at b = 4 bytes, f = 0.25: max(log-softmax 12, rows 12 + 0.25*20, backward 12) N*V."""
    n, v = 1000, 5000
    peak, terms = memory.loss_head_peak(n, v, head="naive", logits_bytes=4, frac=0.25, with_ref=True)
    assert peak == pytest.approx((4 + 4 + 4 + 0.25 * 8 + 0.25 * 12) * n * v)
    assert any("entropy/KL rows" in t.name for t in terms)
    # bf16 logits: the log-softmax moment is 2 + 2 + 4 + 4 = 12, the rows moment 2 + 2 + 4 + 5 = 13 (f = 0.25)
    peak16, _ = memory.loss_head_peak(n, v, head="naive", logits_bytes=2, frac=0.25, with_ref=True)
    assert peak16 == pytest.approx(13 * n * v)


@pytest.mark.slow
@pytest.mark.parametrize("head,ns,chunk", [("naive", "128,256", None), ("fused", "512", 128)])
def test_loss_head_estimate_matches_the_measured_peak_on_cpu(head, ns, chunk):
    """Measured peak (resident set above the inputs) of the EKSFT head at V=151,936 vs the estimate, within 15%."""
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--probe", "head", "--head", head,
           "--n", ns, "--vocab", "151936", "--hidden", "64"] + (["--chunk", str(chunk)] if chunk else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "2"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res = res if isinstance(res, list) else [res]
    for r in res:
        print(f"\n[{head} head] N={r['n']} f={r['selected_fraction']:.3f}: measured {r['measured_bytes'] / 2**20:.0f} MiB, "
              f"estimated {r['estimated_bytes'] / 2**20:.0f} MiB, ratio {r['ratio']:.3f}")  # fmt: skip
        assert r["measured_bytes"] > 0.5 * 2**20 * r["n"]  # a real [N, V]-scale measurement, not noise
        assert abs(r["ratio"] - 1) <= 0.15, r
    if head == "naive":  # linear in N: each doubling of rows doubles the peak
        assert res[1]["measured_bytes"] / res[0]["measured_bytes"] == pytest.approx(2.0, rel=0.15)


def test_dry_run_refuses_an_sft_token_budget_that_cannot_fit(tmp_path, capsys):
    """The old qwen3-8b budget (20,480 tokens per GPU) with the naive head is ~80 GiB per H100: refused, naming
    the knob; the fused head (EKSFT's default, `eksft.head: auto`) fits the same budget."""
    from eksft_pipeline.sft.stage import SFTStage

    budget = ("model=qwen3-8b", "cluster=8gpu", "model.sft.verl.data.max_token_len_per_gpu=20480",
              "model.data.cutoff_tokens=20000")  # fmt: skip
    cfg = compose_pipeline(*budget, "+model.sft.verl.eksft.head=naive")
    stage = SFTStage()
    with pytest.raises(memory.MemoryBudgetError, match=r"max_token_len_per_gpu") as e:
        stage.describe(ctx_for(cfg, tmp_path, stage.key(cfg)))
    assert "exceeds" in str(e.value) and "loss head" in str(e.value)
    printed = capsys.readouterr().out
    assert "sft: estimated peak" in printed and "assumptions:" in printed
    fused = compose_pipeline(*budget)
    desc = stage.describe(ctx_for(fused, tmp_path, stage.key(fused)))
    assert "loss head (fused)" in capsys.readouterr().out and desc["memory_estimate"]["fits"]


def test_dry_run_refuses_an_rl_rollout_share_that_cannot_fit(tmp_path):
    from eksft_pipeline.rl.stage import RLStage

    cfg = compose_pipeline("model=qwen3-8b", "cluster=8gpu", "init=eksft",
                           "model.rl.verl.actor_rollout_ref.rollout.gpu_memory_utilization=0.95")  # fmt: skip
    stage = RLStage()
    with pytest.raises(memory.MemoryBudgetError, match=r"gpu_memory_utilization"):
        stage.describe(ctx_for(cfg, tmp_path, stage.key(cfg)))


@pytest.mark.parametrize("model", GPU_MODELS)
def test_recipe_token_budgets_come_from_the_estimate(tmp_path, model):
    """Each GPU recipe takes the paper's 20,000-token cutoff: a micro-batch (max_token_len_per_gpu x the Ulysses SP
    size) holds its longest sequence and fits an H100 with 15% to spare; the SP size is the smallest at which the
    largest naive-head baseline (asft) fits too (with SP=1 at the same micro-batch it would not); the reference
    weights are kept in bf16."""
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline(f"model={model}", "cluster=8gpu")
    stage = SFTStage()
    vc = stage.verl_config(ctx_for(cfg, tmp_path, stage.key(cfg)))
    est = stage.memory_estimate(ctx_for(cfg, tmp_path, stage.key(cfg)), vc)
    sp = int(vc.engine.ulysses_sequence_parallel_size)
    assert cfg.model.data.cutoff_tokens == 20000  # the paper's (authors' eksft.sh:L48)
    assert vc.data.max_token_len_per_gpu * sp >= vc.data.max_length == cfg.model.data.cutoff_tokens
    assert est.total * 1.15 <= est.capacity_bytes, "\n".join(est.lines())
    assert vc.eksft.ref_model_dtype == "bf16" and est.host_terms[0].formula.startswith("2*")
    shape = memory.shape_from_model(str(cfg.model.path), dict(cfg.model.arch))
    asft = get_loss("asft")

    def asft_at(s):
        return memory.sft_estimate(shape, tokens=int(vc.data.max_token_len_per_gpu) * sp, world=8, sp=s, loss=asft,
                                   ref_dtype="bf16", capacity_bytes=est.capacity_bytes)  # fmt: skip

    assert asft_at(sp).fits and not asft_at(sp // 2).fits


def test_sequence_parallel_terms_by_hand():
    """SP=s: a micro-batch of M tokens puts M/s rows on each rank (the per-token terms equal SP=1 at M/s), plus the
    all-to-all copies of a layer; the reference hidden store is the data-parallel rank's rows; s must divide W."""
    shape = memory.ModelShape(vocab=1000, hidden=64, layers=2, intermediate=2048, heads=4, kv_heads=1, head_dim=16,
                              tied=False)  # fmt: skip
    loss = get_loss("eksft")

    def terms(est):
        return {t.name.split("] ")[-1]: t.bytes for t in est.terms}

    one = terms(memory.sft_estimate(shape, tokens=4096, world=8, loss=loss))
    two = terms(memory.sft_estimate(shape, tokens=8192, world=8, sp=2, loss=loss, ref_store_rows=1000))
    for name in ("activations: layer inputs (checkpointed)", "activations: one layer recomputed + its grads"):
        assert two[name] == one[name]
    # kv heads (1) repeated up to s=2 for the head scatter: 2 bytes * N * (2 q_dim + 2 * 2 * head_dim)
    assert two["Ulysses all-to-all copies (q, k, v, out of a layer)"] == 2 * 4096 * (2 * 64 + 2 * 2 * 16)
    assert two["reference hidden states of the rank's batch"] == 2 * 1000 * 64
    assert "Ulysses all-to-all copies (q, k, v, out of a layer)" not in one
    host = memory.sft_estimate(shape, tokens=8192, world=8, sp=2, loss=loss, ref_store_rows=1000,
                               ref_store_on_host=True)  # fmt: skip
    assert any(t.name.startswith("reference hidden") for t in host.host_terms)
    assert not any("reference hidden" in t.name for t in host.terms)
    with pytest.raises(ValueError, match="must divide"):
        memory.sft_estimate(shape, tokens=8192, world=6, sp=4, loss=loss)


def test_rl_stall_timeout_leaves_room_for_the_first_dapo_step():
    """The stall guard must not kill a healthy first step: 512 prompts x 16 samples (up to 8k tokens) with refills.

    Lower bound of the first step, from the recipe's own numbers and deliberately optimistic rates: an average
    response of half the length limit, 40k generated tokens/s for the whole 8-GPU node, two generation batches
    (dynamic sampling refills), the actor's recompute + update at 150k tokens/s, 10 minutes of start-up.
    """
    for model in ("qwen3-8b", "qwen3-4b"):
        cfg = compose_pipeline(f"model={model}", "cluster=8gpu")
        samples = 512 * 16  # verl recipe: data.train_batch_size x rollout.n (recipes/verl/dapo.yaml)
        tokens = samples * cfg.rl.max_response_length / 2
        first_step_s = 2 * tokens / 40_000 + tokens / 150_000 + 600
        assert cfg.rl.stall_timeout_s >= 1.5 * first_step_s, (model, cfg.rl.stall_timeout_s, first_step_s)


def test_naive_head_baseline_gets_the_largest_budget_that_fits(tmp_path, capsys):
    """qwen3-8b's recipe budget is sized for EKSFT's fused head; asft needs the naive head. Its budget is lowered
    to the largest multiple-of-1024 step that the estimate fits (not below max_length), with a note; the next
    step up would not fit. A typed value is left alone (see the refusal test above)."""
    from eksft_pipeline.sft.stage import SFTStage

    stage = SFTStage()
    # at the recipe's cutoff and SP size asft fits an H100 (test above); a smaller GPU and a shorter cutoff leave
    # room to lower its budget (the floor: the cutoff over the SP size)
    tight = ("cluster.gpu_memory_gib=60", "model.data.cutoff_tokens=10240")
    cfg = compose_pipeline("model=qwen3-8b", "cluster=8gpu", "method=asft", *tight)
    ctx = ctx_for(cfg, tmp_path, stage.key(cfg))
    recipe = int(cfg.model.sft.verl.data.max_token_len_per_gpu)
    vc = stage.verl_config(ctx)
    got = int(vc.data.max_token_len_per_gpu)
    assert -(-int(vc.data.max_length) // int(vc.engine.ulysses_sequence_parallel_size)) <= got < recipe
    assert stage.memory_estimate(ctx, vc).fits
    from omegaconf import open_dict

    with open_dict(vc):
        vc.data.max_token_len_per_gpu = got + 1024
    assert not stage.memory_estimate(ctx, vc).fits
    assert f"max_token_len_per_gpu {recipe} -> {got}" in capsys.readouterr().out
    # EKSFT (fused head) keeps the recipe's budget; fit_token_budget=false keeps it for asft too (then refused)
    eksft = compose_pipeline("model=qwen3-8b", "cluster=8gpu", *tight)
    assert int(stage.verl_config(ctx_for(eksft, tmp_path, stage.key(eksft))).data.max_token_len_per_gpu) == recipe
    off = compose_pipeline("model=qwen3-8b", "cluster=8gpu", "method=asft", *tight, "sft.fit_token_budget=false")
    assert int(stage.verl_config(ctx_for(off, tmp_path, stage.key(off))).data.max_token_len_per_gpu) == recipe
