"""The GPU node's fully resolved version set, `scripts/constraints-gpu.txt`, kept in step with pyproject.toml.

    python scripts/lock_gpu.py resolve   # re-resolve against PyPI for linux x86_64 / CPython 3.11 (~3 min, installs nothing)
    python scripts/lock_gpu.py check     # offline: the lock matches pyproject.toml (run by the test suite)
    python scripts/lock_gpu.py verify    # on the GPU node after `make install-gpu`: installed == lock, NVIDIA driver
    python scripts/lock_gpu.py compat    # import + every recipe validated under the lock's transformers (make test)

resolve: `pip --isolated install --dry-run --ignore-installed --report` of the project's dependencies + the `gpu` and
`dev` extras in a throw-away venv. pip reads each wheel's METADATA from the file PyPI serves next to it (PEP 658,
`<wheel>.metadata`), so the multi-GB torch / nvidia-* CUDA wheels are never downloaded (a few wheels without such a
file are, tens of MB in all). It must run on linux x86_64 with Python 3.11: pip's `--platform` needs
`--only-binary=:all:`, which sdist-only dependencies (antlr4-python3-runtime, ...) refuse. flash-attn is pinned, not
resolved: its setup.py imports torch, so it is built after torch (`make install-gpu`; its deps are in the set).
The lock's header records a hash of pyproject.toml's dependency lists; `check` fails when they changed since the
last resolve (and when any requirement is not satisfied by its pin), naming the command to run.

compat: the GPU set's transformers differs from the CPU install's; `pip install --no-deps --target
.gpu-compat/transformers-<v>` (git-ignored, reused) and, with it first on PYTHONPATH, run
`scripts/gpu_compat_check.py` (every package module imported, every recipe composed and validated against verl, a
Qwen3-like tokenizer + the run's chat template through verl's HFModelConfig and SFT dataset).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "scripts" / "constraints-gpu.txt"
PYPROJECT = REPO / "pyproject.toml"
COMPAT_DIR = REPO / ".gpu-compat"
EXTRAS = ("gpu", "dev")  # resolved together with the core dependencies
BUILT_AFTER = ("flash-attn",)  # extras installed after torch (pinned in the lock, not resolved)
# CUDA 13.x needs an R580+ driver (NVIDIA CUDA 13.0 release notes: >= 580.65.06 on Linux)
MIN_DRIVER = {13: ("580.65.06", (580, 65, 6)), 12: ("525.60.13", (525, 60, 13))}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> dict[str, list[str]]:
    p = tomllib.loads(PYPROJECT.read_text())["project"]
    out = {"dependencies": list(p["dependencies"])}
    for extra, reqs in p.get("optional-dependencies", {}).items():
        out[f"extra:{extra}"] = list(reqs)
    return out


def requirements_hash() -> str:
    reqs = project_requirements()
    keep = {k: v for k, v in reqs.items() if k == "dependencies" or k.split(":", 1)[1] in EXTRAS + BUILT_AFTER}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def read_lock(path: Path = LOCK) -> tuple[dict[str, str], dict[str, str]]:
    """({canonical name: version}, {header key: value})."""
    pins, header = {}, {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            m = re.match(r"#\s*([a-z0-9-]+):\s*(.*)$", line)
            if m:
                header[m.group(1)] = m.group(2).strip()
            continue
        if not line:
            continue
        name, _, version = line.partition("==")
        if not version:
            raise ValueError(f"{path}: not a name==version pin: {line!r}")
        if canon(name) in pins:
            raise ValueError(f"{path}: {name} is pinned twice")
        pins[canon(name)] = version
    return pins, header


# ---------------------------------------------------------------------------------------------------- resolve


def resolve(python: str) -> int:
    reqs = project_requirements()
    wanted = reqs["dependencies"] + [r for e in EXTRAS for r in reqs[f"extra:{e}"]]
    built_after = [r for e in BUILT_AFTER for r in reqs.get(f"extra:{e}", [])]
    with tempfile.TemporaryDirectory(prefix="lock-gpu-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        ver = subprocess.run([py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        if ver != "3.11" or platform.machine() != "x86_64" or sys.platform != "linux":
            print(f"resolve must run on linux x86_64 with Python 3.11 (got {sys.platform} {platform.machine()} {ver})")
            return 2
        subprocess.run([py, "-m", "pip", "--isolated", "install", "-q", "--upgrade", "pip"], check=True)
        report = Path(tmp) / "report.json"
        t0 = time.time()
        subprocess.run([py, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), *wanted], check=True)  # fmt: skip
        pip_version = subprocess.run([py, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
        items = json.loads(report.read_text())["install"]
    pins = sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in items)
    lines = [
        "# GPU node install set (make install-gpu): every package `verl[vllm]==0.9.1` + this project resolve to, pinned.",
        "# Generated by `python scripts/lock_gpu.py resolve` -- do not edit; `python scripts/lock_gpu.py check` keeps it",
        "# in step with pyproject.toml (run by the test suite). torch 2.11.0 here is the PyPI wheel built for CUDA 13.0:",
        "# it needs an NVIDIA driver >= 580.65.06 (R580). flash-attn is built after torch (--no-build-isolation).",
        f"# resolved: {time.strftime('%Y-%m-%d')} with pip {pip_version} against PyPI, linux x86_64, CPython 3.11 "
        f"({time.time() - t0:.0f}s, metadata only)",
        f"# requirements-sha256: {requirements_hash()}",
        *[f"{n}=={v}" for n, v in pins],
        "# built after torch (make install-gpu step 2):",
        *built_after,
    ]
    LOCK.write_text("\n".join(lines) + "\n")
    print(f"wrote {LOCK} ({len(pins)} packages + {len(built_after)} built after torch)")
    return check()


# ------------------------------------------------------------------------------------------------------ check


def problems() -> list[str]:
    """What is wrong with the lock against pyproject.toml (empty: in step)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins, header = read_lock()
    out = []
    if header.get("requirements-sha256") != requirements_hash():
        out.append("pyproject.toml's dependencies or gpu/dev/flash-attn extras changed since the lock was resolved "
                   "(requirements-sha256)")  # fmt: skip
    reqs = project_requirements()
    groups = ["dependencies"] + [f"extra:{e}" for e in EXTRAS + BUILT_AFTER]
    for group in groups:
        for raw in reqs.get(group, []):
            r = Requirement(raw)
            if r.marker is not None and not r.marker.evaluate({"python_version": "3.11", "sys_platform": "linux"}):
                continue
            v = pins.get(canon(r.name))
            if v is None:
                out.append(f"{r.name} ({group}) is not pinned")
                continue
            if not r.specifier.contains(Version(v), prereleases=True):
                out.append(f"{r.name}=={v} does not satisfy {raw!r} ({group})")
    for must in ("torch", "transformers", "vllm", "flash-attn"):  # verl[vllm] brings vllm; flash-attn built after
        if must not in pins:
            out.append(f"{must} is not pinned")
    return out


def check() -> int:
    bad = problems()
    if bad:
        print(f"{LOCK.relative_to(REPO)} is out of step with pyproject.toml:\n  - " + "\n  - ".join(bad)
              + "\nRe-resolve it (linux x86_64, Python 3.11, network to PyPI): python scripts/lock_gpu.py resolve")  # fmt: skip
        return 1
    pins, _ = read_lock()
    print(f"{LOCK.relative_to(REPO)}: {len(pins)} pins in step with pyproject.toml "
          f"(torch {pins['torch']}, transformers {pins['transformers']}, vllm {pins['vllm']}, verl {pins['verl']})")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------------- verify


def driver_problem(torch_cuda: str | None, driver: str | None) -> str | None:
    """A message if the NVIDIA driver is too old for torch's CUDA major version (None: fine / unknown)."""
    if not torch_cuda or not driver:
        return None
    major = int(torch_cuda.split(".")[0])
    need = MIN_DRIVER.get(major)
    have = tuple(int(x) for x in re.findall(r"\d+", driver)[:3])
    if need and have < need[1]:
        return (f"torch is built for CUDA {torch_cuda}, which needs an NVIDIA driver >= {need[0]}; this node has "
                f"{driver}: upgrade the driver (R{need[1][0]}+) or install a torch built for an older CUDA")
    return None


def verify() -> int:
    from importlib import metadata

    pins, _ = read_lock()
    wrong = []
    for name, want in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed (lock {want})")
            continue
        if canon(have.split("+")[0]) != canon(want.split("+")[0]):
            wrong.append(f"{name}: {have} installed, lock {want}")
    try:
        import torch

        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        driver = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        driver = None
    drv = driver_problem(torch_cuda, driver)
    if wrong or drv:
        print("the installed environment differs from scripts/constraints-gpu.txt:\n  - " + "\n  - ".join(wrong + ([drv] if drv else [])))
        return 1
    print(f"installed == scripts/constraints-gpu.txt ({len(pins)} packages); torch CUDA {torch_cuda}, driver {driver or 'unknown'}")
    return 0


# ----------------------------------------------------------------------------------------------------- compat


def compat(python: str) -> int:
    pins, _ = read_lock()
    version = pins["transformers"]
    target = COMPAT_DIR / f"transformers-{version}"
    if not (target / "transformers" / "__init__.py").exists():
        tmp = target.with_name(target.name + ".tmp")
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                        f"transformers=={version}"], check=True)  # fmt: skip
        os.replace(tmp, target)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "EKSFT_EXPECT_TRANSFORMERS": version, "HF_HUB_OFFLINE": "1"}  # fmt: skip
    return subprocess.run([python, str(REPO / "scripts" / "gpu_compat_check.py")], env=env, cwd=REPO).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["resolve", "check", "verify", "compat"])
    ap.add_argument("--python", default=sys.executable, help="interpreter for resolve (3.11) / compat")
    a = ap.parse_args(argv)
    if a.command == "resolve":
        return resolve(a.python)
    if a.command == "check":
        return check()
    if a.command == "verify":
        return verify()
    return compat(a.python)


if __name__ == "__main__":
    sys.exit(main())
