"""Experiment tracking end to end, offline: the shared tiny run (`tiny_run`, tests/conftest.py) runs with
`tracking=wandb` and WANDB_MODE=offline, so no extra pipeline run is paid. Checked from the files W&B wrote
(`<run_dir>/tracking/wandb/offline-run-*`, read back with contract/tracking.py's reader):

- the manifest's `tracking_group` and every tracked stage's record (name, run id, group, offline);
- each run's own record (name `<stage>/<method>`, group, job type) -- what W&B shows;
- the SFT history holds the loss and the selection statistics (`eksft/...`), equal to the metrics file; the DAPO
  history holds the reward (`critic/score/mean`), equal to the metrics file; one eval run per target model with
  avg@n and the pass@k curve equal to its metrics.json; the report run exists and the report lists the runs;
- `report.source=tracker` reads the same training curves as the files.
"""

from __future__ import annotations

import json

import pytest
import yaml

from eksft_pipeline.contract import tracking as T

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRACKED = ["sft/eksft", "rl/eksft", "eval/eksft", "report"]


def _rows(run_dir, rec):
    return T.history(rec, run_dir)


def test_tiny_run_is_tracked_offline_with_group_names_and_histories(complete_tiny_run):
    run_dir = complete_tiny_run.run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    group = manifest["tracking_group"]
    assert group.startswith("tiny-run-"), group
    stages = manifest["stages"]
    for key in ("assets", "split", "handoff/eksft"):  # nothing to log: no tracker run
        assert "tracking" not in stages[key], key
    recs = {}
    for key in TRACKED:
        rec = stages[key]["tracking"]
        assert rec["name"] == key and rec["group"] == group and rec["backends"] == ["wandb"], rec
        assert rec["mode"] == "offline" and rec["job_type"] == key.split("/")[0] and rec["dirs"] == {"wandb": "tracking"}
        recs[key] = rec
        if key.startswith("eval/"):
            continue  # eval's runs are one per target model (checked below)
        dirs = T.wandb_run_dirs(run_dir / "tracking", rec["run_id"])
        assert dirs and all(d.name.startswith("offline-run-") for d in dirs), (key, rec["run_id"])
        info = T.read_wandb_run_info(dirs[0])
        assert (info["name"], info["group"], info["job_type"], info["run_id"]) == (
            key, group, key.split("/")[0], rec["run_id"]), info

    # SFT through verl's tracker: the loss and the selection statistics, step for step as in the metrics file
    sft = _rows(run_dir, recs["sft/eksft"])
    files = {int(k): v for k, v in json.loads((run_dir / "sft/eksft/metrics.json").read_text()).items()}
    assert sorted(sft) == sorted(files) and len(sft) >= 2
    assert all("train/loss" in m and "eksft/mask_frac" in m for m in files.values())
    for step, m in files.items():
        assert sft[step]["train/loss"] == pytest.approx(m["train/loss"], rel=1e-6)
        assert sft[step]["eksft/mask_frac"] == pytest.approx(m["eksft/mask_frac"], rel=1e-6)
    assert any(k.startswith("eksft/iou") for k in sft[max(sft)]), sorted(sft[max(sft)])

    # DAPO through verl's tracker (in the Ray TaskRunner): the reward
    rl = _rows(run_dir, recs["rl/eksft"])
    files = {int(k): v for k, v in json.loads((run_dir / "rl/eksft/metrics.json").read_text()).items()}
    planned = yaml.safe_load((run_dir / "rl/eksft/verl_dapo.yaml").read_text())["trainer"]["total_training_steps"]
    assert sorted(rl) == sorted(files)
    # step 0 is verl's validation before training (val-only); steps 1..planned are the training steps
    trained = sorted(s for s, m in files.items() if "critic/score/mean" in m)
    assert trained == list(range(1, planned + 1)) and planned >= 8, (trained, planned)
    assert set(files) - set(trained) == {0} and any(k.startswith("val-core/") for k in files[0]), sorted(files[0])
    for step in trained:
        assert rl[step]["critic/score/mean"] == pytest.approx(files[step]["critic/score/mean"], rel=1e-6)

    # eval: one run per target model, avg@n and the pass@k curve of its metrics.json
    runs = stages["eval/eksft"]["summary"]["tracking_runs"]
    assert set(runs) == {"base", "sft", "rl"}
    for target, sub in runs.items():
        assert sub["name"] == f"eval/eksft/{target}" and sub["run_id"] == f"{recs['eval/eksft']['run_id']}-{target}"
        d = T.wandb_run_dirs(run_dir / "tracking", sub["run_id"])
        assert d and T.read_wandb_run_info(d[0])["group"] == group
        hist = _rows(run_dir, {**recs["eval/eksft"], "run_id": sub["run_id"]})
        m = json.loads((run_dir / "eval/eksft" / target / "metrics.json").read_text())["benchmarks"]
        for bench, bm in m.items():
            assert hist[1][f"{bench}/avg@n"] == pytest.approx(bm["avg@n"])
            for k, v in bm["pass@k"].items():
                assert hist[int(k)][f"{bench}/pass@k"] == pytest.approx(v)

    # the report lists every run and the group
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Tracking" in md and f"`{group}`" in md and "wandb sync" in md
    for key in ("sft/eksft", "rl/eksft", "report"):
        assert f"`{recs[key]['run_id']}`" in md, key
    for sub in runs.values():
        assert f"`{sub['run_id']}`" in md


def test_report_source_tracker_reads_the_same_curves(complete_tiny_run):
    from eksft_pipeline.analysis.gather import gather

    run_dir = complete_tiny_run.run_dir
    files, tracker = gather([run_dir]), gather([run_dir], source="tracker")
    assert tracker.tracker_notes and all("tracker run" in n for n in tracker.tracker_notes), tracker.tracker_notes
    for attr, key in (("sft_metrics", "train/loss"), ("rl_metrics", "critic/score/mean")):
        a, b = getattr(files, attr)["eksft"], getattr(tracker, attr)["eksft"]
        assert sorted(a) == sorted(b)
        steps = [s for s in sorted(a) if key in a[s]]  # RL's step 0 holds only the validation before training
        assert len(steps) >= 2 and all(key in b[s] for s in steps)
        assert [b[s][key] for s in steps] == pytest.approx([a[s][key] for s in steps], rel=1e-6)
