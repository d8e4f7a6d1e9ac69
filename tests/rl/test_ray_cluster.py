"""The RL stage on a Ray cluster that someone else started (`cluster.ray_address`), as on a GPU node.

A real local cluster is started by the test (`ray start --head --block` on 127.0.0.1, its own --temp-dir and free
ports, an environment WITHOUT the stage's variables), the tiny DAPO stage runs through it (verl's TaskRunner and
workers are processes of that cluster), and its metrics must arrive in the stage's metrics file: verl's file logger
only writes where VERL_FILE_LOGGER_PATH points, which the workers get through the job's runtime_env
(`ray_kwargs.ray_init.runtime_env`, eksft_pipeline/rl/stage.py), not by inheritance. The cluster is stopped by
signalling the `ray start --block` process group the test started (never a global `ray stop`); Ray writes the
cluster's address into the test's own temp dir, so /tmp/ray/ray_current_cluster -- where another process's plain
`ray.init()` would look -- is left untouched (checked).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ray_local import DEFAULT_ADDRESS_FILE, local_ray_cluster
from ray_local import our_processes as _our_processes

REPO = Path(__file__).resolve().parents[2]


def _rl_inputs(root: Path) -> dict[str, str]:
    """A random tiny Qwen3 (the handoff's output) and an RL split of easy prompts, as the upstream stages write them."""
    from eksft_pipeline.data.schema import RL_SCHEMA
    from eksft_pipeline.data.synth import TINY_SYSTEM_PROMPT, to_rl_eval_rows, write_parquet
    from eksft_pipeline.models.tiny import build_tiny_model
    from eksft_pipeline.models.tokenizer import build_tiny_tokenizer, render_chatml

    texts = [render_chatml([{"role": "system", "content": TINY_SYSTEM_PROMPT},
                            {"role": "user", "content": f"What is {a} + {b}?"},
                            {"role": "assistant", "content": f"<think>\n{a}+{b}\n</think>\n\\boxed{{{a + b}}}"}])
             for a in range(5) for b in range(5)]  # fmt: skip
    tok = build_tiny_tokenizer(None, texts, vocab_size=300)
    model = root / "model"
    build_tiny_model(model, tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    probs = [{"data_source": "tiny_add", "problem": f"What is {a} + {b}?", "answer": str(a + b)}
             for a in range(4) for b in range(4)]  # fmt: skip
    split = root / "split"
    split.mkdir()
    rl = write_parquet(to_rl_eval_rows(probs), split / "rl_train.parquet", RL_SCHEMA)
    (split / "split_report.json").write_text(json.dumps({"generation_prefix": ""}))
    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.contract.run_format import run_format_from_config, write_run_format

    # the split's record of the run's format (template, prefix), which the RL stage reads through ctx.run_format
    fmt = write_run_format(split, run_format_from_config(compose_pipeline("model=tiny"), resolve_dir=True))
    return {"model": str(model), "rl_train": str(rl), "report": str(split / "split_report.json"),
            "run_format": str(fmt)}


@pytest.mark.slow
def test_rl_stage_runs_on_an_existing_ray_cluster_and_its_metrics_arrive(tmp_path, monkeypatch):
    from eksft_pipeline.contract.manifest import Manifest
    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.contract.stage_api import StageContext
    from eksft_pipeline.rl.stage import RLStage

    inputs = _rl_inputs(tmp_path)
    default_before = DEFAULT_ADDRESS_FILE.read_text() if DEFAULT_ADDRESS_FILE.exists() else None
    with local_ray_cluster() as (address, temp):
        # another process's plain ray.init() looks here: it must not have been pointed at this test's cluster
        assert (DEFAULT_ADDRESS_FILE.read_text() if DEFAULT_ADDRESS_FILE.exists() else None) == default_before
        run_dir = tmp_path / "run"
        manifest = Manifest(run_dir)
        for key, outputs in (("split", {"rl_train": inputs["rl_train"], "report": inputs["report"],
                                        "run_format": inputs["run_format"]}),
                             ("handoff/eksft", {"model": inputs["model"]})):  # fmt: skip
            manifest.start(key, {}, "test", {})
            manifest.complete(key, outputs, {})
        cfg = compose_pipeline(
            "model=tiny", "cluster=cpu", "stage=rl", "init=eksft", f"run_dir={run_dir}",
            f"cluster.ray_address={address}", "model.rl.total_training_steps=1", "model.rl.max_response_length=48",
            "++model.rl.verl.actor_rollout_ref.rollout.n=2", "rl.stall_timeout_s=400",
        )  # fmt: skip
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the cluster (see local_ray_cluster)
        stage = RLStage()
        ctx = StageContext(cfg=cfg, run_dir=run_dir, manifest=manifest, key=stage.key(cfg))
        t0 = time.time()
        result = stage.run(ctx)
        print(f"\n[ray cluster] DAPO stage through {address}: {time.time() - t0:.0f}s")
        metrics = json.loads(Path(result.outputs["metrics"]).read_text())
        assert "1" in metrics and "critic/score/mean" in metrics["1"], metrics
        assert (Path(result.outputs["hf_model"]) / "config.json").exists()
        # verl's TaskRunner ran as a worker of THIS cluster (its log sits in this cluster's session dir)
        logs = [p for p in temp.glob("session_*/logs/worker-*") if p.is_file()]
        assert any("TaskRunner" in p.read_text(errors="replace") for p in logs), [p.name for p in logs][:20]
    assert not _our_processes(str(temp)), "processes of the test's Ray cluster survived its shutdown"
    assert (DEFAULT_ADDRESS_FILE.read_text() if DEFAULT_ADDRESS_FILE.exists() else None) == default_before
