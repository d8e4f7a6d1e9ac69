"""The installs: each machine kind its own, the GPU set recorded and in step, the GPU transformers checked.

* `make -n -B install-gpu reproduce MODEL=qwen3-8b` must not run the CPU install (it would put torch 2.13 CPU /
  transformers 5.10 / fastapi 0.165 over what verl[vllm] resolves); every target uses the install of its cluster.
* flash-attn's setup.py imports torch: it is installed after torch with --no-build-isolation, never from the `gpu`
  extra (a plain `pip install -e .[gpu]` fails under build isolation on a fresh node).
* scripts/constraints-gpu.txt, the resolved GPU set, is in step with pyproject.toml.
* the package imports and every recipe validates under the GPU set's transformers (5.9.0 vs 5.10.4 in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import lock_gpu  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make_n(*args: str, venv: Path) -> str:
    out = subprocess.run(["make", "-n", *args, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_gpu_targets_use_the_gpu_install_only(tmp_path):
    out = make_n("-B", "install-gpu", "reproduce", "MODEL=qwen3-8b", venv=tmp_path / "venv")
    assert "constraints-cpu" not in out, out
    lines = out.splitlines()
    gpu = next(i for i, x in enumerate(lines) if '-c scripts/constraints-gpu.txt -e ".[gpu,dev]"' in x)
    fa = next(i for i, x in enumerate(lines) if "--no-build-isolation" in x and "flash-attn==2.8.3" in x)
    verify = next(i for i, x in enumerate(lines) if "lock_gpu.py verify" in x)
    run = next(i for i, x in enumerate(lines) if "-m eksft_pipeline stage=all" in x)
    assert gpu < fa < verify < run  # torch (via verl[vllm]) first, then flash-attn against it, checked, then the run
    assert "cluster=8gpu" in lines[run]


def test_gpu_dry_run_uses_the_install_already_here(tmp_path):
    """`make reproduce MODEL=qwen3-8b DRY_RUN=1` only composes and prints: on a CPU machine it runs with the CPU
    install (no CUDA set, no flash-attn build), so the 8-GPU commands and memory estimates can be read anywhere."""
    out = make_n("-B", "reproduce", "MODEL=qwen3-8b", "DRY_RUN=1", venv=tmp_path / "venv")
    assert "constraints-gpu" not in out and "flash-attn" not in out, out
    assert "-c scripts/constraints-cpu.txt" in out
    assert any("-m eksft_pipeline stage=all" in x and "cluster=8gpu" in x and "dry_run=true" in x
               for x in out.splitlines()), out


def test_tracking_variable_selects_the_tracker_for_every_stage_and_the_report(tmp_path):
    """`make reproduce TRACKING=wandb METHODS=sft,eksft`: the multirun, the report and the export all get tracking=wandb."""
    out = make_n("-B", "reproduce", "MODEL=tiny", "METHODS=sft,eksft", "TRACKING=wandb", venv=tmp_path / "venv")
    runs = [x for x in out.splitlines() if "-m eksft_pipeline" in x]
    assert len(runs) == 3 and all(" tracking=wandb" in x for x in runs), out
    plain = make_n("-B", "reproduce", "MODEL=tiny", venv=tmp_path / "venv")
    assert "tracking=" not in plain, plain  # the recipe's default, not an empty override


def test_cpu_targets_use_the_cpu_install_unless_the_gpu_one_is_there(tmp_path):
    venv = tmp_path / "venv"
    out = make_n("-B", "reproduce", "MODEL=tiny", venv=venv)
    assert "-c scripts/constraints-cpu.txt" in out and "constraints-gpu" not in out
    # a venv that holds the GPU install runs the CPU cluster and the tests with it: no CPU install over it
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed-gpu").touch()
    for target in (["reproduce", "MODEL=tiny"], ["test"], ["tiny-model"]):
        out = make_n(*target, venv=venv)
        # (`make test` also brings up the separate vLLM CPU venv, .venv-vllm: not this venv)
        mine = [x for x in out.splitlines() if ".venv-vllm" not in x]
        assert not any("pip install" in x for x in mine), (target, out)
    # and `make install` refuses to overwrite it
    res = subprocess.run(["make", "install", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "holds the GPU install" in res.stdout + res.stderr


def test_flash_attn_is_not_in_the_gpu_extra():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(r.startswith("flash-attn") for r in extras["gpu"]), extras["gpu"]
    assert extras["flash-attn"] == ["flash-attn==2.8.3"]


def test_gpu_lock_is_in_step_with_pyproject():
    assert lock_gpu.problems() == []
    pins, header = lock_gpu.read_lock()
    # what verl[vllm]==0.9.1 resolves to, the versions the README and the compat check name
    assert (pins["verl"], pins["torch"], pins["vllm"], pins["transformers"]) == ("0.9.1", "2.11.0", "0.24.0", "5.9.0")
    assert pins["flash-attn"] == "2.8.3" and pins["nvidia-cuda-runtime"].startswith("13.0")
    assert int(pins["fastapi"].split(".")[1]) < 137  # vLLM 0.24 needs fastapi < 0.137 (the CPU set has 0.165)


def test_lock_check_catches_a_dependency_change(tmp_path, monkeypatch):
    (tmp_path / "scripts").mkdir()
    lock = tmp_path / "scripts" / "constraints-gpu.txt"
    lock.write_text(lock_gpu.LOCK.read_text())
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(lock_gpu.PYPROJECT.read_text().replace('"numpy>=2.0"', '"numpy>=2.4"'))
    monkeypatch.setattr(lock_gpu, "LOCK", lock)
    monkeypatch.setattr(lock_gpu, "PYPROJECT", pyproject)
    monkeypatch.setattr(lock_gpu, "REPO", tmp_path)
    bad = lock_gpu.problems()
    assert any("requirements-sha256" in b for b in bad) and any(b.startswith("numpy==2.3.5 does not satisfy") for b in bad)
    assert lock_gpu.check() == 1


def test_driver_check_for_cuda_13():
    assert "580.65.06" in lock_gpu.driver_problem("13.0", "570.133.20")
    assert lock_gpu.driver_problem("13.0", "580.82.07") is None and lock_gpu.driver_problem("12.8", "570.1.1") is None


@pytest.mark.slow
def test_package_and_recipes_under_the_gpu_transformers():
    """`make check-gpu-compat`: transformers 5.9.0 (pip --target, .gpu-compat/) first on PYTHONPATH."""
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "lock_gpu.py"), "compat"], cwd=REPO,
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "gpu-compat: transformers 5.9.0" in out and "recipes compose and validate" in out and "OK" in out


def test_shared_data_is_required_under_ci(monkeypatch):
    """CI always has ../shared: under CI=true (or EKSFT_REQUIRE_SHARED=1) a test needing it fails, never skips."""
    from conftest import require_shared  # tests/conftest.py (pytest puts tests/ on the path)

    monkeypatch.delenv("EKSFT_REQUIRE_SHARED", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert not require_shared()
    monkeypatch.setenv("CI", "true")
    assert require_shared()
    monkeypatch.setenv("CI", "false")
    monkeypatch.setenv("EKSFT_REQUIRE_SHARED", "1")
    assert require_shared()
