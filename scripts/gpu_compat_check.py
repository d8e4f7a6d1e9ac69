"""The package under the GPU set's transformers: every module imports, every recipe composes and validates.

Run by `python scripts/lock_gpu.py compat` (and `make check-gpu-compat`, part of `make test`) with the GPU lock's
transformers first on PYTHONPATH (`EKSFT_EXPECT_TRANSFORMERS` names its version). Checks:
  1. transformers is that version, loaded from the compat folder;
  2. every module of eksft_pipeline imports;
  3. every model recipe with its clusters (tiny: cpu; the others: 8gpu; qwen3-8b also 2x8gpu): the SFT stage's verl
     config (verl's dataclasses, the memory estimate) and the RL stage's (verl's own validation);
  4. tests/data/test_chat_template.py: Qwen3's template, the run template through verl's HFModelConfig and SFT
     dataset, the split's EOS check -- the tokenizer / chat-template code paths transformers owns.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    t0 = time.time()
    import transformers

    want = os.environ.get("EKSFT_EXPECT_TRANSFORMERS")
    if want and transformers.__version__ != want:
        print(f"gpu-compat: transformers {transformers.__version__} from {transformers.__file__}, expected {want}")
        return 1
    print(f"gpu-compat: transformers {transformers.__version__} ({Path(transformers.__file__).parent})", flush=True)

    import eksft_pipeline

    mods = [m.name for m in pkgutil.walk_packages(eksft_pipeline.__path__, "eksft_pipeline.")]
    for name in mods:
        importlib.import_module(name)
    print(f"gpu-compat: {len(mods)} modules import", flush=True)

    from eksft_pipeline.contract.manifest import Manifest
    from eksft_pipeline.contract.recipes import compose_pipeline, recipes_dir
    from eksft_pipeline.contract.stage_api import StageContext
    from eksft_pipeline.rl.stage import RLStage
    from eksft_pipeline.sft.stage import SFTStage

    combos = []
    for p in sorted((recipes_dir() / "model").glob("*.yaml")):
        clusters = ["cpu"] if p.stem == "tiny" else ["8gpu"] + (["2x8gpu"] if p.stem == "qwen3-8b" else [])
        combos += [(p.stem, c) for c in clusters]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        for model, cluster in combos:
            cfg = compose_pipeline(f"model={model}", f"cluster={cluster}", "init=eksft")
            sft, rl = SFTStage(), RLStage()
            ctx = StageContext(cfg=cfg, run_dir=run, manifest=Manifest(run), key="sft/eksft", dry_run=True)
            vc = sft.verl_config(ctx)
            est = sft.memory_estimate(ctx, vc)
            if est is not None:
                est.check()
            ctx = StageContext(cfg=cfg, run_dir=run, manifest=Manifest(run), key="rl/eksft", dry_run=True)
            rl.validate_verl(rl.verl_config(ctx))
    print(f"gpu-compat: {len(combos)} model/cluster recipes compose and validate (SFT + RL)", flush=True)

    import pytest

    rc = pytest.main(["-q", "-p", "no:cacheprovider", str(REPO / "tests" / "data" / "test_chat_template.py")])
    print(f"gpu-compat: {'OK' if rc == 0 else 'FAILED'} in {time.time() - t0:.0f}s", flush=True)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
