"""Step 1 in bf16 (losses/selection.py, rule 1): the policy (fp32 master weights, bf16 autocast) and the reference
(bf16 weights) are the same model but round differently, so the computed KL is positive noise; where the policy IS
the reference, KL is 0 by definition and M_KL is empty, as in fp32. On CPU, a small random Qwen3 (~1 s)."""

from __future__ import annotations

import copy

import pytest
import torch

from eksft_pipeline.losses import get_loss


@pytest.fixture(scope="module")
def logits():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    policy = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        policy.lm_head.weight.mul_(20)  # peaked distributions, as a trained model's
    ref = copy.deepcopy(policy).to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z_bf16 = policy(ids).logits
        z_ref_bf16 = ref(ids).logits
        z32 = policy(ids).logits
    labels = ids[:, 1:].reshape(-1)
    return (z_bf16[:, :-1].reshape(-1, 512), z_ref_bf16[:, :-1].reshape(-1, 512), z32[:, :-1].reshape(-1, 512),
            labels)


@pytest.mark.parametrize("name", ["eksft", "eksft_no_entropy_reg", "eksft_no_kl_reg", "kl_mask_only"])
def test_step1_kl_mask_is_empty_in_bf16_as_in_fp32(logits, name):
    z_bf16, z_ref, z32, labels = logits
    loss = get_loss(name)
    # fp32, the same model twice: KL exactly 0, M_KL empty
    s32 = loss.stats(z32, z32.clone(), labels)
    assert float(s32.kl.abs().max()) == 0.0 and loss.plan(s32).metrics["n_mask_kl"] == 0
    # bf16: the same weights round differently -> KL > 0 on most tokens, and the top-k of it would be noise
    s16 = loss.stats(z_bf16, z_ref, labels)
    noise = s16.kl[s16.valid]
    assert float((noise > 0).float().mean()) > 0.5 and 1e-6 < float(noise.mean()) < 0.05
    k = loss.plan(s16).metrics["k"]
    assert loss.plan(s16).metrics["n_mask_kl"] == k > 0
    # the rule: where pi_theta IS pi_ref, KL = 0 by definition -> M_KL empty, M = M_H
    same = s16.policy_is_reference()
    assert float(same.kl.abs().max()) == 0.0 and torch.equal(same.ref_logp, same.logp)
    assert torch.equal(same.entropy, s16.entropy)  # nothing else changes
    plan = loss.plan(same)
    assert plan.metrics["n_mask_kl"] == 0 and plan.metrics["kl_mask"] == 0.0
    mask = plan.token["mask"]
    if "mask_h" in plan.token:
        assert torch.equal(mask, plan.token["mask_h"] if name != "kl_mask_only" else torch.zeros_like(mask))


def test_policy_is_reference_without_reference_stats_is_unchanged(logits):
    z_bf16, _, _, labels = logits
    s = get_loss("sft").stats(z_bf16, None, labels)
    assert s.policy_is_reference() is s
