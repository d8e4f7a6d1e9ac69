"""The run directory's manifest: what each stage consumed, produced, and whether it finished.

`<run_dir>/manifest.json` holds one entry per stage key (e.g. "split", "sft/eksft", "rl/eksft"):

    {"status": "running" | "complete" | "failed",
     "config": {...the stage's resolved config...}, "config_hash": "sha256:...",
     "inputs":  {"name": {"path": ..., "hash": ...}},
     "outputs": {"name": {"path": ..., "hash": ...}},
     "summary": {...numbers the stage reports...},
     "started": iso-time, "finished": iso-time, "pid": int, "host": str, "error": str | null,
     "attempts": int}

A stage is skipped only when its entry is `complete`, its config hash is unchanged and every
recorded output still exists with the recorded hash. Writes are atomic (tmp file + rename) under an
advisory file lock, so a killed process never leaves a half-written manifest.

Hashes: files up to 256 MiB get a sha256 of their content; larger files (model weights, checkpoints)
and directories get a fingerprint of (relative path, size, mtime_ns) of every file -- cheap to
recompute on an 8B checkpoint and still changes whenever a file is rewritten.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

FULL_HASH_LIMIT = 256 * 1024 * 1024


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def hash_path(path: str | os.PathLike) -> str | None:
    """Content hash of a file, or a fingerprint of a directory / large file; None if missing."""
    p = Path(path)
    if not p.exists():
        return None
    if p.is_file():
        size = p.stat().st_size
        if size <= FULL_HASH_LIMIT:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return "sha256:" + h.hexdigest()
        st = p.stat()
        return "fp:" + hashlib.sha256(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "dir:" + h.hexdigest()


def _abs(path) -> str:
    """Absolute form of a local path (hub names and other non-paths are kept as given)."""
    p = Path(str(path)).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def config_hash(config: Any) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


class Manifest:
    """Read-modify-write access to `<run_dir>/manifest.json`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "manifest.json"
        self._lock_path = self.run_dir / ".manifest.lock"

    # -- low level ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict:
        if not self.path.exists():
            return {"version": 1, "stages": {}}
        try:
            with open(self.path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"{self.path} is not valid JSON ({e}); move it away to start a fresh run") from e

    def _write(self, data: dict) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def update(self, key: str, **fields) -> dict:
        with self._locked():
            data = self.read()
            entry = data["stages"].setdefault(key, {})
            entry.update(fields)
            self._write(data)
            return entry

    def entry(self, key: str) -> dict | None:
        return self.read()["stages"].get(key)

    # -- stage lifecycle --------------------------------------------------------------------------
    def is_complete(self, key: str, cfg_hash: str) -> tuple[bool, str]:
        """(complete?, reason) -- reason says why a stage must run."""
        e = self.entry(key)
        if e is None:
            return False, "never run"
        if e.get("status") != "complete":
            return False, f"last attempt {e.get('status', 'unknown')}"
        if e.get("config_hash") != cfg_hash:
            return False, "config changed since the completed run"
        for name, out in (e.get("outputs") or {}).items():
            h = hash_path(out["path"])
            if h is None:
                return False, f"output {name!r} missing: {out['path']}"
            if h != out.get("hash"):
                return False, f"output {name!r} changed on disk: {out['path']}"
        return True, "complete"

    def start(self, key: str, config: Any, cfg_hash: str, inputs: dict[str, str]) -> None:
        prev = self.entry(key) or {}
        self.update(
            key,
            status="running",
            config=config,
            config_hash=cfg_hash,
            inputs={k: {"path": _abs(v), "hash": hash_path(v)} for k, v in inputs.items()},
            outputs={},
            summary={},
            started=_now(),
            finished=None,
            pid=os.getpid(),
            host=socket.gethostname(),
            error=None,
            attempts=int(prev.get("attempts", 0)) + 1,
        )

    def complete(self, key: str, outputs: dict[str, str], summary: dict | None = None) -> None:
        missing = [f"{k}={v}" for k, v in outputs.items() if not Path(v).exists()]
        if missing:
            raise RuntimeError(f"stage {key} finished but its outputs are missing: {', '.join(missing)}")
        self.update(
            key,
            status="complete",
            outputs={k: {"path": _abs(v), "hash": hash_path(v)} for k, v in outputs.items()},
            summary=summary or {},
            finished=_now(),
        )

    def fail(self, key: str, error: str) -> None:
        self.update(key, status="failed", error=error[-4000:], finished=_now())

    def outputs(self, key: str) -> dict[str, str]:
        """Recorded output paths of a COMPLETE stage (raises with a clear message otherwise)."""
        e = self.entry(key)
        if e is None or e.get("status") != "complete":
            state = "never run" if e is None else e.get("status")
            raise FileNotFoundError(
                f"stage {key!r} has no complete output in {self.run_dir} (status: {state}); run it first"
            )
        return {k: v["path"] for k, v in e["outputs"].items()}
