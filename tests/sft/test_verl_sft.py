"""EKSFT through verl 0.9.1's SFT trainer on CPU (the `cpu` platform shim, gloo), 1 and 2 processes.

Each run goes through the orchestrator's `sft` stage exactly as `python -m eksft_pipeline stage=sft`
does (compose -> validate -> verl's Ray SFT trainer -> export hf_model -> drift.json), on a small Qwen3 built
here with an UNTIED lm_head (as Qwen3-4B/8B: FSDP2 wraps it as its own unit, so the fused head runs
inside that unit; the tied case is the tiny default of the end-to-end test). `eksft.dump_dir` makes
the trainer write every step's selection per rank and every update's gradients, so the tests can
recompute them independently.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.orchestrator.runner import run_pipeline

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def _overrides(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"model.assets_dir={assets}",
        "model.data.n_sft=48",
        # 48 conversations, global batch 16 -> 3 steps per epoch
        "model.sft.verl.data.train_batch_size=16",
        "model.sft.verl.data.micro_batch_size_per_gpu=4",
        "model.sft.verl.trainer.total_epochs=2",
        "model.sft.verl.optim.lr=3e-3",
        *extra,
    ]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    from eksft_pipeline.data.tiny_assets import make_tiny_assets

    out = tmp_path_factory.mktemp("assets")
    paths = make_tiny_assets(out, n_problems=200, n_eval_per_source=4, n_pretrain=400, pretrain_steps=30,
                             model_kwargs=MODEL, progress=False)
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(str(paths["model"]))
    return out


def _run(assets: Path, run_dir: Path, *extra: str) -> dict:
    run_pipeline(compose_pipeline("stage=split", *_overrides(assets, run_dir, *extra)))
    res = run_pipeline(compose_pipeline("stage=sft", *_overrides(assets, run_dir, *extra)))
    assert res[0]["status"] == "complete"
    return res[0]


def _metrics(run_dir: Path, method: str) -> dict[int, dict]:
    """The SFT metrics of `method`, or of its one variant in this run dir (settings that differ from the recipe
    are part of the stage key: `method.params.rho=0` runs as sft/eksft-rho_0..., see contract/keys.method_tag)."""
    d = run_dir / "sft" / method
    if not d.is_dir():
        found = sorted((run_dir / "sft").glob(f"{method}-*"))
        assert len(found) == 1, (method, found)
        d = found[0]
    return {int(k): v for k, v in json.loads((d / "metrics.json").read_text()).items()}


def _dumps(d: Path, step: int) -> list[dict]:
    return [torch.load(p) for p in sorted(d.glob(f"step{step:05d}_rank*.pt"))]


def _concat(dumps: list[dict]) -> dict:
    def cat(get):
        return torch.cat([get(d) for d in dumps])

    return {
        "seq_key": cat(lambda d: d["seq_key"]),
        "pos": cat(lambda d: d["pos"]),
        "stats": {k: cat(lambda d, k=k: d["stats"][k]) for k in dumps[0]["stats"]},
        "plan": {k: cat(lambda d, k=k: d["plan"][k]) for k in dumps[0]["plan"]},
        "metrics": dumps[0]["metrics"],
    }


def _by_token(c: dict) -> dict[tuple[int, int], int]:
    return {(int(s), int(p)): i for i, (s, p) in enumerate(zip(c["seq_key"], c["pos"]))}


@pytest.fixture(scope="module")
def two_rank_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_ranks")
    dump = run_dir / "dump"
    res = _run(assets, run_dir, "sft.nproc_per_node=2", f"+sft.verl.eksft.dump_dir={dump}")
    return run_dir, dump, res


def test_two_ranks_train_and_the_loss_decreases(two_rank_run):
    run_dir, _, res = two_rank_run
    m = _metrics(run_dir, "eksft")
    assert sorted(m) == [1, 2, 3, 4, 5, 6]
    ce = [m[s]["eksft/ce_unmasked"] for s in sorted(m)]
    assert ce[-1] < ce[0], ce
    out = run_dir / "sft" / "eksft"
    # the trained model fits the SFT conversations better than the initial model (CE on response tokens)
    base = Path(json.loads((run_dir / "manifest.json").read_text())["stages"]["split"]["inputs"]["tokenizer"]["path"])
    sft_rows = run_dir / "split" / "sft_train.parquet"
    before, after = _response_ce(base, sft_rows), _response_ce(out / "hf_model", sft_rows)
    assert after < before - 0.05, (before, after)
    assert (out / "hf_model" / "model.safetensors").is_file() and (out / "drift.json").is_file()
    drift = json.loads((out / "drift.json").read_text())
    assert 0 < drift["overall"]["rel_norm"] < 1
    assert res["summary"]["steps"] == 6


def test_two_rank_selection_equals_the_single_process_selection_of_the_gathered_batch(two_rank_run):
    """Top-k over the global batch: the union of both ranks' masks == the plan of all tokens in one process."""
    from eksft_pipeline.losses import TokenStats, get_loss

    run_dir, dump, _ = two_rank_run
    loss = get_loss("eksft", rho=0.2, lambda_entropy=0.05, lambda_kl=0.05)
    logged = _metrics(run_dir, "eksft")
    for step in (2, 5):  # after updates: KL(pi_theta || pi_ref) > 0
        dumps = _dumps(dump, step)
        assert len(dumps) == 2, "one dump per rank"
        c = _concat(dumps)
        n = c["seq_key"].numel()
        stats = TokenStats(valid=torch.ones(n, dtype=torch.bool), vocab_size=int(loss_vocab(run_dir)),
                           **{k: v for k, v in c["stats"].items()})
        plan = loss.plan(stats)
        assert torch.equal(plan.token["mask"].bool(), c["plan"]["mask"].bool()), step
        # independently: top-k by value with k = ceil(0.2 n), union of the two
        k = -(-2 * n // 10)
        h, kl = c["stats"]["entropy"], c["stats"]["kl"]
        mh = torch.zeros(n, dtype=torch.bool)
        mh[torch.topk(h, k).indices] = True
        mk = torch.zeros(n, dtype=torch.bool)
        mk[torch.topk(kl, k).indices] = True
        assert torch.equal(mh | mk, c["plan"]["mask"].bool()), step
        # what the trainer logged for the step equals a recomputation from the dumped statistics
        inter, union = int((mh & mk).sum()), int((mh | mk).sum())
        assert logged[step]["eksft/n_mask"] == union and logged[step]["eksft/n_tokens"] == n
        assert logged[step]["eksft/k"] == k
        assert logged[step]["eksft/iou"] == pytest.approx(inter / union, rel=1e-6)
        assert logged[step]["eksft/mask_frac"] == pytest.approx(union / n, rel=1e-6)
        assert logged[step]["eksft/entropy_mask"] == pytest.approx(float(h[mh | mk].mean()), rel=1e-5)


def _response_ce(model_dir: Path, parquet: Path, n: int = 16) -> float:
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eksft_pipeline.analysis.case_study import render_case

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for msgs in pd.read_parquet(parquet)["messages"].head(n):
        ids, start = render_case(tok, [dict(x) for x in msgs])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        gold = torch.tensor(ids[start:])
        total -= float(logp[start - 1 : -1].gather(-1, gold[:, None]).sum())
        count += gold.numel()
    return total / count


def loss_vocab(run_dir: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(run_dir / "sft" / "eksft" / "hf_model").vocab_size


@pytest.fixture(scope="module")
def one_rank_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_rank")
    _run(assets, run_dir, f"+sft.verl.eksft.dump_dir={run_dir / 'dump'}", "model.sft.verl.trainer.total_epochs=1")
    return run_dir


def test_one_and_two_ranks_see_the_same_tokens_and_statistics(two_rank_run, one_rank_run):
    """Step 1 (same weights on both): identical global batch, identical per-token entropy."""
    _, dump2, _ = two_rank_run
    one, two = _concat(_dumps(one_rank_run / "dump", 1)), _concat(_dumps(dump2, 1))
    i1, i2 = _by_token(one), _by_token(two)
    assert set(i1) == set(i2) and len(i1) == one["seq_key"].numel()
    order1 = torch.tensor([i1[t] for t in sorted(i1)])
    order2 = torch.tensor([i2[t] for t in sorted(i1)])
    torch.testing.assert_close(one["stats"]["entropy"][order1], two["stats"]["entropy"][order2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one["stats"]["logp"][order1], two["stats"]["logp"][order2], rtol=1e-4, atol=1e-5)
    # KL is 0 on both (policy == reference before the first update). The tie rule (losses/selection.py) selects no
    # token by KL then -- not the first k rows of the batch -- so the entropy top-k alone is the mask.
    for c in (one, two):
        assert float(c["stats"]["kl"].abs().max()) < 1e-5
        assert not c["plan"]["mask_kl"].bool().any() and c["metrics"]["n_mask_kl"] == 0
        # the trainer knew it (no optimizer step yet, the reference is the initial model) and logged what it measured
        assert 0.0 <= c["metrics"]["kl_all_measured"] < 1e-5
        assert torch.equal(c["plan"]["mask"].bool(), c["plan"]["mask_h"].bool())


def _grads(run_dir: Path, step: int, update: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "dump" / f"grads_step{step:05d}_update{update}.pt")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_fused_head_equals_the_naive_head_in_fp32(one_rank_run, assets, tmp_path):
    """eksft.head=fused (hidden states + lm_head weight, no [N, V]) vs the naive head (verl's full logits), fp32:
    every step's loss and every parameter's gradient within 1e-5 relative; the reference runs once per step."""
    naive = tmp_path / "naive"
    _run(assets, naive, f"+sft.verl.eksft.dump_dir={naive / 'dump'}", "+sft.verl.eksft.head=naive",
         "model.sft.verl.trainer.total_epochs=1")
    fused_m, naive_m = _metrics(one_rank_run, "eksft"), _metrics(naive, "eksft")
    assert sorted(fused_m) == sorted(naive_m) == [1, 2, 3]
    for step in (1, 2, 3):
        assert fused_m[step]["train/loss"] == pytest.approx(naive_m[step]["train/loss"], rel=1e-5), step
        gf, gn = _grads(one_rank_run, step), _grads(naive, step)
        assert sorted(gf) == sorted(gn) and any("lm_head" in k for k in gf)
        worst = max(_rel(gf[k], gn[k]) for k in gn)
        assert worst < 1e-5, (step, worst)
        for m in (fused_m[step], naive_m[step]):
            assert m["eksft/ref_forwards_per_step"] == 1.0 and m["eksft/policy_forwards_per_step"] == 2.0


UPDATES = ("+method.updates_per_batch=2", "model.sft.verl.optim.lr=1e-2")


@pytest.fixture(scope="module")
def sft_two_updates(assets, tmp_path_factory):
    """Plain SFT, two optimizer updates per batch (8 sequences each), gradients dumped."""
    run_dir = tmp_path_factory.mktemp("sft2")
    _run(assets, run_dir, "method=sft", *UPDATES, f"+sft.verl.eksft.dump_dir={run_dir / 'dump'}",
         "model.sft.verl.trainer.total_epochs=1")
    return run_dir


def test_rho_zero_is_plain_sft_step_for_step(assets, sft_two_updates):
    run_dir = sft_two_updates
    _run(assets, run_dir, "method=eksft", "method.params.rho=0", *UPDATES, "model.sft.verl.trainer.total_epochs=1")
    a, b = _metrics(run_dir, "eksft"), _metrics(run_dir, "sft")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert a[s]["eksft/n_mask"] == 0 and a[s]["eksft/updates"] == b[s]["eksft/updates"] == 2
        assert a[s]["train/loss"] == pytest.approx(b[s]["train/loss"], rel=1e-4), s
        for key in ("train/grad_norm", "eksft/grad_norm_first", "eksft/grad_norm_last"):
            assert a[s][key] == pytest.approx(b[s][key], rel=1e-3), (s, key)


def test_psft_keeps_pi_old_over_the_updates_of_a_batch(assets, sft_two_updates, tmp_path):
    """psft_hybrid's schedule (eksft.updates_per_batch): pi_old is the policy at the start of the batch. The first update
    (ratio 1) has exactly SFT's gradient; the second one, from the same weights as SFT's second update, does not,
    and its clip acts."""
    run_dir = tmp_path / "psft"
    _run(assets, run_dir, "method=psft_hybrid", "method.updates_per_batch=2", "model.sft.verl.optim.lr=1e-2",
         f"+sft.verl.eksft.dump_dir={run_dir / 'dump'}", "+model.sft.verl.trainer.total_training_steps=1")
    m = _metrics(run_dir, "psft_hybrid")[1]
    assert m["eksft/updates"] == 2 and "eksft/ref_forwards_per_step" not in m  # PSFT needs no reference model
    g_psft0, g_sft0 = _grads(run_dir, 1, 0), _grads(sft_two_updates, 1, 0)
    assert max(_rel(g_psft0[k], g_sft0[k]) for k in g_sft0) < 1e-5
    assert m["eksft/clip_frac_last"] > 0.0 and m["eksft/grad_norm_first"] == pytest.approx(
        _metrics(sft_two_updates, "sft")[1]["eksft/grad_norm_first"], rel=1e-5)
    g_psft1, g_sft1 = _grads(run_dir, 1, 1), _grads(sft_two_updates, 1, 1)
    assert max(_rel(g_psft1[k], g_sft1[k]) for k in g_sft1) > 1e-2


def test_psft_refreshes_pi_old_every_k_steps_within_the_same_budget(assets, tmp_path):
    """psft (eksft.pi_old_every=2 here, 8 in its recipe): one update per batch, as every other method; the pre-pass
    of step 2 runs on the weights of step 1 (pi_old), so its ratio is no longer 1 and the loss -mean(min(r, clip))
    moves off -1, while the training pass runs on the current weights (restored after the pre-pass: with pi_old's
    weights the ratio would be exactly 1). Step 3 refreshes pi_old: ratio 1, loss -1 again."""
    run_dir = tmp_path / "psft"
    args = ("method=psft", "method.pi_old_every=2", "model.sft.verl.optim.lr=1e-2",
            "+model.sft.verl.trainer.total_training_steps=3")
    _run(assets, run_dir, *args)
    m = _metrics(run_dir, "psft")
    assert sorted(m) == [1, 2, 3]
    assert [m[s]["eksft/pi_old_age"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert all("eksft/updates" not in m[s] for s in m)  # one optimizer update per batch
    assert m[1]["train/loss"] == pytest.approx(-1.0, abs=1e-6) and m[3]["train/loss"] == pytest.approx(-1.0, abs=1e-6)
    assert abs(m[2]["train/loss"] + 1.0) > 1e-4

    # killed after saving its last step (3 of 3, below 2 epochs x 3 steps): the re-run resumes there and trains
    # nothing (verl 0.9.1 alone trains a step 4, verl_ext/sft_trainer.resumed_at_last_step)
    (out,) = (run_dir / "sft").glob("psft*")  # sft/psft-<tag of pi_old_every=2>
    key = f"sft/{out.name}"
    Manifest(run_dir).update(key, status="killed")
    weights = (out / "hf_model" / "model.safetensors").read_bytes()
    res = run_pipeline(compose_pipeline("stage=sft", *_overrides(assets, run_dir, *args)))
    assert res[0]["status"] == "complete" and Manifest(run_dir).entry(key)["attempts"] == 2
    assert sorted(_metrics(run_dir, "psft")) == [1, 2, 3] and res[0]["summary"]["steps"] == 3
    assert (out / "hf_model" / "model.safetensors").read_bytes() == weights


def test_official_recipe_selects_per_sequence_with_equal_weights(assets, tmp_path):
    """method=eksft_official (selection_scope=sequence): k = floor(0.2 n_s) per sequence, and the logged loss of
    step 1 equals the authors' loss recomputed per sequence with an HF forward and averaged with equal weights."""
    from transformers import AutoModelForCausalLM

    from eksft_pipeline.losses import IGNORE_INDEX, get_loss

    run_dir = tmp_path / "official"
    _run(assets, run_dir, "method=eksft_official", f"+sft.verl.eksft.dump_dir={run_dir / 'dump'}",
         "+model.sft.verl.trainer.total_training_steps=1")
    (d,) = _dumps(run_dir / "dump", 1)
    logged = _metrics(run_dir, "eksft_official")[1]
    model = AutoModelForCausalLM.from_pretrained(Path(assets) / "model").eval()
    loss = get_loss("eksft_official", rho=0.2, lambda_entropy=0.05, lambda_kl=0.05)
    total, n_seq = 0.0, len(d["sequences"])
    for i, (ids, lm) in enumerate(zip(d["sequences"], d["loss_masks"])):
        rows = (d["seq_of_token"] == i).nonzero().squeeze(1)
        valid = torch.roll(lm, -1).bool()
        valid[-1] = False
        assert int(valid.sum()) == rows.numel()
        plan = {k: v[rows] for k, v in d["plan"].items()}
        n = rows.numel()
        assert int(plan["mask_h"].sum()) == int(plan["mask_kl"].sum()) == int(0.2 * n)
        top = torch.topk(d["stats"]["entropy"][rows], int(0.2 * n)).indices
        assert bool(plan["mask_h"][top].bool().all())
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].float()[valid]
        labels = torch.roll(ids, -1)[valid]
        scalars = {k[len("scalar:"):]: float(v[0]) for k, v in plan.items() if k.startswith("scalar:")}
        fields = {k: plan[k].bool() for k in ("mask", "mask_h", "mask_kl")}
        part, _ = loss.compute(logits, labels, logits, fields, scalars)  # step 1: the reference is the model
        assert float(plan["unit_weight"][0]) == pytest.approx(1 / n_seq)
        total += float(part) / n_seq
        assert IGNORE_INDEX not in labels.tolist()
    assert logged["train/loss"] == pytest.approx(total, rel=1e-4)
    assert logged["eksft/n_units"] == n_seq and logged["eksft/iou_seq_count"] > 0


# mid-epoch resume after a kill is also what the two-node test does (in `make test`): this variant is `long`
@pytest.mark.parametrize(("save_freq", "epochs"), [pytest.param(2, 2, marks=pytest.mark.long), (3, 3)],
                         ids=["mid_epoch", "epoch_boundary"])
def test_kill_and_resume_continues_from_the_last_checkpoint(assets, tmp_path, save_freq, epochs):
    """Killed after its first checkpoint, a re-run resumes there and trains the remaining steps.

    3 steps per epoch: save_freq=2 resumes mid-epoch (step 2 or 4 of 6), save_freq=3 at an epoch boundary (step 3
    or 6 of 9), where verl 0.9.1 alone would restore an exhausted dataloader and skip the next epoch. The Ray workers
    outlive the kill -9 until the watchdog ends them (about a second), so they may save one more checkpoint: the
    epoch-boundary case runs 3 epochs so that one is an epoch boundary too, and not the last step.
    """
    total = 3 * epochs
    run_dir = tmp_path / "resume"
    ov = _overrides(assets, run_dir, f"sft.verl.trainer.save_freq={save_freq}",
                    f"model.sft.verl.trainer.total_epochs={epochs}")
    run_pipeline(compose_pipeline("stage=split", *ov))
    ckpt = run_dir / "sft" / "eksft" / "checkpoints"
    cmd = [sys.executable, "-m", "eksft_pipeline", "stage=sft", *ov]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not (ckpt / "latest_checkpointed_iteration.txt").is_file():
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # killed: never marked complete; once its watchdog has ended the run's processes it records 'killed'
    deadline = time.time() + 60
    while Manifest(run_dir).entry("sft/eksft")["status"] == "running" and time.time() < deadline:
        time.sleep(0.2)
    assert Manifest(run_dir).entry("sft/eksft")["status"] == "killed"
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved % save_freq == 0 and save_freq <= saved < total, saved

    res = run_pipeline(compose_pipeline("stage=sft", *ov))
    assert res[0]["status"] == "complete"
    logs = sorted((run_dir / "sft" / "eksft" / "logs").glob("metrics-*.jsonl"), key=lambda p: p.stat().st_mtime)
    steps = {p.name: [json.loads(x)["step"] for x in p.read_text().splitlines() if x.strip()] for p in logs}
    resumed = steps[logs[-1].name] if logs else []
    assert resumed == list(range(saved + 1, total + 1)), (saved, steps)
    assert Manifest(run_dir).entry("sft/eksft")["attempts"] == 2


def test_handoff_merges_the_fsdp_shards_of_a_two_rank_checkpoint(two_rank_run, assets):
    """`stage=handoff init=<verl checkpoint dir>` with only FSDP shards: verl's merger rebuilds the full model.

    The shards are those of the two-rank run (DTensors sharded over 2 gloo ranks); the merged weights must
    equal the HF model verl itself gathered at that step, and the merged model must pass the handoff checks.
    """
    from safetensors.torch import load_file

    run_dir, _, _ = two_rank_run
    ckpts = sorted((run_dir / "sft" / "eksft" / "checkpoints").glob("global_step_*"), key=lambda p: int(p.name[12:]))
    ckpt = ckpts[-1]
    assert sorted(p.name for p in ckpt.glob("model_world_size_*_rank_*.pt")) == [
        "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]  # fmt: skip
    assert not list(ckpt.glob("*.safetensors"))  # the merge path, not an HF directory
    res = run_pipeline(compose_pipeline("stage=handoff", f"init={ckpt}", *_overrides(assets, run_dir)))
    assert res[0]["status"] == "complete"
    report = json.loads(Path(res[0]["outputs"]["report"]).read_text())
    # verl's merger alone writes bf16; the handoff re-gathers the fp32 shards (checked against verl's result)
    assert report["merged_fsdp"] is True and report["merge"]["precision"] == "float32", report["merge"]
    assert all(report[c]["ok"] for c in ("weights", "template", "eos", "context")), report
    merged = load_file(str(Path(res[0]["outputs"]["model"]) / "model.safetensors"))
    reference = load_file(str(ckpt / "huggingface" / "model.safetensors"))
    assert sorted(merged) == sorted(reference)
    for name, t in reference.items():
        assert torch.equal(merged[name], t), name


def test_sft_across_two_ray_nodes_global_selection_kill_resume_handoff_rl(assets, one_rank_run, tmp_path, monkeypatch):
    """The SFT stage as one Ray job over two nodes of a real localhost cluster (`ray start --head` + `ray start
    --address`, one logical GPU each, so the two ranks land on different nodes; gloo between them):

    - kill -9 of the orchestrator mid-run: 10 s later no process of the run is alive (the Ray workers carry the run's
      variables through runtime_env, so the watchdog finds them on a cluster it did not start) and the cluster's
      resources are free again;
    - the re-run resumes from verl's last checkpoint and finishes;
    - step 1's selection (same weights, same global batch) equals the one-process run's: the top-k is global across
      the nodes;
    - the final checkpoint holds the two ranks' shards, and the handoff and one RL step run from the stage's model.
    """
    from ray_local import cluster_resources, local_ray_cluster

    from eksft_pipeline.contract import procs

    run_dir, dump = tmp_path / "nodes", tmp_path / "nodes" / "dump"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the test's cluster (tests/ray_local.py)
    with local_ray_cluster(num_cpus=2, num_gpus=1, worker_nodes=1) as (address, _):
        ov = _overrides(assets, run_dir, "cluster.nnodes=2", "sft.nproc_per_node=1", f"cluster.ray_address={address}",
                        f"+sft.verl.eksft.dump_dir={dump}", "+model.sft.verl.trainer.total_training_steps=3",
                        "sft.verl.trainer.save_freq=1")  # fmt: skip
        run_pipeline(compose_pipeline("stage=split", *ov))
        ckpt = run_dir / "sft" / "eksft" / "checkpoints"
        mark = f"ray-nodes-{os.getpid()}"
        proc = subprocess.Popen([sys.executable, "-m", "eksft_pipeline", "stage=sft", *ov], cwd=REPO,
                                env={**os.environ, "EKSFT_TEST_MARK": mark}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            deadline = time.time() + 400
            while time.time() < deadline and not (ckpt / "latest_checkpointed_iteration.txt").is_file():
                assert proc.poll() is None, "the run ended before it could be killed"
                time.sleep(0.5)
            workers = procs.find({"EKSFT_TEST_MARK": mark})
            os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only: its watchdog must end the rest
            proc.wait()
            time.sleep(10)
            left = procs.find({"EKSFT_TEST_MARK": mark})
        finally:
            for pid in procs.find({"EKSFT_TEST_MARK": mark}):
                os.kill(pid, signal.SIGKILL)
        assert len(workers) >= 3, workers  # driver + two Ray workers at least, before the kill
        assert not left, procs.describe(left)
        res = cluster_resources(address)
        assert res["total"]["GPU"] == 2 and res["available"].get("GPU") == 2, res
        saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
        assert 1 <= saved < 3

        result = run_pipeline(compose_pipeline("stage=sft", *ov))[0]  # same config: resumes
        assert result["status"] == "complete"
    logs = sorted((run_dir / "sft" / "eksft" / "logs").glob("metrics-*.jsonl"), key=lambda p: p.stat().st_mtime)
    resumed = [json.loads(x)["step"] for x in logs[-1].read_text().splitlines() if x.strip()]
    assert resumed == list(range(saved + 1, 4)), resumed

    # the selection of step 1 across two nodes == the one-process run's over the same batch
    one, two = _concat(_dumps(one_rank_run / "dump", 1)), _concat(_dumps(dump, 1))
    assert len(_dumps(dump, 1)) == 2  # one dump per rank
    i1, i2 = _by_token(one), _by_token(two)
    assert set(i1) == set(i2)
    keys = sorted(i1)
    for field in ("mask", "mask_h"):
        a = one["plan"][field][torch.tensor([i1[t] for t in keys])].bool()
        b = two["plan"][field][torch.tensor([i2[t] for t in keys])].bool()
        assert torch.equal(a, b), field
    assert one["metrics"]["n_mask"] == two["metrics"]["n_mask"] > 0

    final = ckpt / "global_step_3"
    assert sorted(p.name for p in final.glob("model_world_size_*_rank_*.pt")) == [
        "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]  # fmt: skip
    # handoff + one RL step from the stage's model (a local Ray: the test's cluster is gone)
    rl_ov = [o for o in ov if not o.startswith("cluster.")] + [
        "init=eksft", "rl.total_training_steps=1", "+rl.verl.data.train_batch_size=4",
        "+rl.verl.actor_rollout_ref.rollout.n=2", "+rl.verl.actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "rl.val_every=null"]  # fmt: skip
    for stage in ("handoff", "rl"):
        res = run_pipeline(compose_pipeline(f"stage={stage}", *rl_ov))
        assert res[0]["status"] == "complete", (stage, res)
    rl_metrics = json.loads((run_dir / "rl" / "eksft" / "metrics.json").read_text())
    assert "1" in rl_metrics
