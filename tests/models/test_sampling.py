"""RowSampler: per-row generators (a row's draws do not depend on its batch), HF's warper order, log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from eksft_pipeline.models.sampling import RowSampler, sample_seed


def _draws(sampler: RowSampler, scores: torch.Tensor, steps: int) -> torch.Tensor:
    picks = []
    for _ in range(steps):
        out = sampler(torch.zeros(1), scores)  # [R, V]: 0 at the drawn token, -inf elsewhere
        assert torch.isinf(out).sum(-1).tolist() == [scores.shape[1] - 1] * scores.shape[0]
        picks.append(out.argmax(-1))
    return torch.stack(picks, 1)  # [R, steps]


def test_a_row_draws_the_same_tokens_whatever_rows_share_its_batch():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=g)
    alone = _draws(RowSampler([7], 1.0), scores[1:2], 20)
    batched = _draws(RowSampler([3, 7, 9], 1.0), scores, 20)
    assert torch.equal(batched[1], alone[0])
    assert not torch.equal(batched[0], batched[1])  # other seeds draw otherwise


def test_support_and_logprobs_follow_temperature_top_k_top_p_min_p():
    # logits chosen so that each filter removes something (hand-computed below)
    logits = torch.log(torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04]]))
    # temperature 1; top_k 4 -> {0,1,2,3} renormalised: .4/.9, .25/.9, .15/.9, .1/.9 = .444, .278, .167, .111
    # top_p 0.8: cumulative .444, .722, .889 -> keep {0,1,2} (the prefix reaching 0.8)
    # min_p 0.4: threshold 0.4 * .444 = .178 -> drops 2 (.167) -> support {0, 1}, p = .4/.65, .25/.65
    s = RowSampler([1], temperature=1.0, top_p=0.8, top_k=4, min_p=0.4)
    picks = _draws(s, logits, 300)[0]
    assert set(picks.tolist()) == {0, 1}
    want = {0: math.log(0.40 / 0.65), 1: math.log(0.25 / 0.65)}
    lp = s.logprobs()[0]
    assert lp.shape == (300,)
    for t, tok in enumerate(picks.tolist()):
        assert lp[t].item() == pytest.approx(want[tok], abs=1e-5)
    share = (picks == 0).float().mean().item()
    assert abs(share - 0.40 / 0.65) < 0.1  # 300 draws: std ~0.028


def test_temperature_scales_before_the_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    s = RowSampler([5], temperature=0.5)
    tok = _draws(s, logits, 1)[0, 0].item()
    assert s.logprobs()[0, 0].item() == pytest.approx(torch.log_softmax(logits[0] / 0.5, -1)[tok].item(), abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        RowSampler([1], temperature=0.0)


def test_sample_seed_is_stable_text_hashing():
    assert sample_seed(42, "p", 3) == sample_seed("42", "p", "3")  # printable parts, ':'-joined
    assert sample_seed(42, "p", 3) != sample_seed(42, "p", 4)
    assert 0 <= sample_seed("x") < 2**63 - 1
