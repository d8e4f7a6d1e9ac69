"""The fused head equals the naive head inside verl's SFT trainer on CUDA (fp32). Skipped without a GPU.

    pytest -m gpu tests/sft/test_verl_sft_gpu.py        # on a GPU node, one GPU is enough

Same runs as tests/sft/test_verl_sft.py::test_fused_head_equals_the_naive_head_in_fp32 (untied tiny Qwen3,
fp32 weights and compute, the `sft` stage with `cluster=8gpu` launched locally on one GPU), so the CUDA code
path of the fused head (eager fp32 chunks, FSDP2 lm_head unit, reference hidden states on the device) is
compared with verl's full-logits path: every step's loss and every parameter's gradient within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from test_verl_sft import _grads, _metrics, _rel, _run, assets  # noqa: F401  (assets is a fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU = ("cluster=8gpu", "cluster.launcher=local", "cluster.gpus_per_node=1", "sft.nproc_per_node=1",
       "model.sft.verl.model.override_config.attn_implementation=sdpa", "model.sft.verl.trainer.total_epochs=1")


@pytest.mark.parametrize("store", ["device", "host"])
def test_fused_head_equals_the_naive_head_on_cuda(assets, tmp_path, store):  # noqa: F811
    runs = {}
    for head in ("fused", "naive"):
        run_dir = tmp_path / head
        _run(assets, run_dir, *GPU, f"+sft.verl.eksft.head={head}", f"+sft.verl.eksft.ref_hidden_store={store}",
             f"+sft.verl.eksft.dump_dir={run_dir / 'dump'}")
        runs[head] = run_dir
    fm, nm = _metrics(runs["fused"], "eksft"), _metrics(runs["naive"], "eksft")
    assert sorted(fm) == sorted(nm) == [1, 2, 3]
    for step in fm:
        assert fm[step]["train/loss"] == pytest.approx(nm[step]["train/loss"], rel=1e-5), step
        gf, gn = _grads(runs["fused"], step), _grads(runs["naive"], step)
        assert max(_rel(gf[k], gn[k]) for k in gn) < 1e-5, step
        assert fm[step]["eksft/ref_forwards_per_step"] == 1.0
