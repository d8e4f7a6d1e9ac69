"""The run directory's manifest: what each stage consumed, produced, and whether it finished.

`<run_dir>/manifest.json` holds run-wide values (`tracking_group`: the tracker group of this run
directory, contract/tracking.py) and one entry per stage key (e.g. "split", "sft/eksft", "rl/eksft"):

    {"status": "running" | "complete" | "failed" | "killed" | "stale",
     "config": {...the stage's resolved config...}, "config_hash": "sha256:...",
     "inputs":  {"name": {"path": ..., "hash": ...}},
     "outputs": {"name": {"path": ..., "hash": ...}},
     "summary": {...numbers the stage reports...},
     "started": iso-time, "finished": iso-time, "pid": int, "pid_start": int, "host": str,
     "run_token": str, "error": str | null, "stale_reason": str (only when stale), "attempts": int,
     "tracking": {...tracker run of this attempt: backends, group, name, run_id, ...} (tracking on only)}

Paths inside the run directory are recorded RELATIVE to it (`sft/eksft/hf_model`), everything else
absolute, so a run directory can be moved, archived or copied (`cp -r runs/tiny runs/variant`) and
"complete" always means "these files, here, with these hashes". `Manifest.outputs(key)` and
`resolve_recorded` turn recorded paths back into absolute ones.

A stage is skipped only when its entry is `complete`, its config hash is unchanged and every
recorded output still exists with the recorded hash. When a stage starts again, every entry that
consumed its outputs (transitively) is marked `stale`: its results were made from files that are
being replaced, so no report reads them and no later stage trusts them until they are re-run -- or
until the re-run stage reproduces the very same files (a deterministic split, a re-export from the same
checkpoint): then `revalidate` finds their inputs unchanged and marks them complete again.

Hashes are of CONTENT, so that a copy of a run directory keeps its complete stages: a file is its
sha256, a directory the sha256 of its files' relative paths and sha256s. Files of 64 MiB or more
(model weights) are hashed once per (device, inode, size, mtime, ctime) and the result cached in
`<run_dir>/.hash_cache.json`; a copy or any rewrite has a new inode/ctime and is hashed again.
Entries written before content hashing (`dir:` / `fp:` fingerprints of sizes and mtimes) are still
checked the old way.

Inputs are checked against what their producer recorded (`verify_inputs`, before a stage cleans anything):
every recorded output also carries per-file records (`files`: relative path -> sha256, for a directory) and,
for files of 64 MiB or more, a cheap `fingerprint` (`fingerprint_file`: the size, the first 1 MiB -- a
safetensors / parquet header --, the last 64 KiB and 16 sampled 64 KiB blocks). The fingerprint is compared
first: a truncated or rewritten 16 GB checkpoint is named in milliseconds without reading it all; then the
sha256 (cached per inode, see above) catches a change the samples missed. A mismatch names the file and the
stage that recorded it, and marks that stage (and every complete entry that records the same file) `stale`.

One owner per attempt: `claim` checks and records `running` inside one lock (a live owner -- same host, its
orchestrator process still running -- is refused), and `fail` / `complete` only write an entry whose
`run_token` is still the caller's (`owner`): a losing run can never overwrite the live attempt's entry.

Writes are atomic (tmp file + fsync + rename, the previous version kept as `manifest.json.bak`)
under an advisory file lock, so a kill never leaves a half-written manifest; an unreadable
manifest.json falls back to the .bak with a warning. A failed write (e.g. ENOSPC) leaves the
previous manifest intact and raises OSError; the runner reports it next to the original error.
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

from eksft_pipeline.contract.errors import PipelineError

CACHE_MIN_BYTES = 64 * 1024 * 1024
STATUSES = ("running", "complete", "failed", "killed", "stale")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def sha256_file(p: Path) -> str:
    """Hex sha256 of a file's bytes (the one file-hash helper of the package)."""
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_sha256_file = sha256_file  # HashCache's hook (tests count its calls)


class HashCache:
    """sha256 of large files keyed by (device, inode, size, mtime_ns, ctime_ns); persisted best-effort."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, list] = {}
        self.dirty = False
        if path is not None and path.exists():
            try:
                self.data = json.loads(path.read_text())
            except (OSError, ValueError):
                self.data = {}

    def sha256(self, p: Path) -> str:
        st = p.stat()
        if st.st_size < CACHE_MIN_BYTES:
            return _sha256_file(p)
        sig = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        key = str(p.resolve())
        hit = self.data.get(key)
        if hit is not None and hit[:-1] == sig:
            return hit[-1]
        digest = _sha256_file(p)
        self.data[key] = [*sig, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:  # a cache: never worth failing a run for
            with contextlib.suppress(OSError):
                tmp.unlink()


def hash_path(path: str | os.PathLike, cache: HashCache | None = None) -> str | None:
    """Content hash of a file (`sha256:`) or a directory tree (`tree:`); None if missing."""
    p = Path(path)
    if not p.exists():
        return None
    cache = cache or HashCache(None)
    if p.is_file():
        return "sha256:" + cache.sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{cache.sha256(f)}\n".encode())
    return "tree:" + h.hexdigest()


def _legacy_hash(p: Path) -> str | None:
    """The pre-content-hash scheme (fingerprints of size + mtime), to check entries recorded with it."""
    if not p.exists():
        return None
    if p.is_file():
        st = p.stat()
        return "fp:" + hashlib.sha256(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "dir:" + h.hexdigest()


FP_HEAD = 1 << 20
FP_BLOCK = 64 << 10
FP_SAMPLES = 16


def fingerprint_file(p: Path) -> str:
    """Cheap fingerprint of a large file: size + first 1 MiB + last 64 KiB + 16 evenly spaced 64 KiB blocks
    (about 2.1 MiB read whatever the size). Detects truncation, padding, a damaged header and most rewrites;
    `Manifest` still compares the full sha256 after it (see the module docstring)."""
    size = p.stat().st_size
    h = hashlib.sha256(f"{size}\0".encode())
    with open(p, "rb") as f:
        h.update(f.read(FP_HEAD))
        for i in range(1, FP_SAMPLES + 1):
            off = (size * i) // (FP_SAMPLES + 1)
            f.seek(off)
            h.update(f.read(FP_BLOCK))
        f.seek(max(0, size - FP_BLOCK))
        h.update(f.read(FP_BLOCK))
    return "fp1:" + h.hexdigest()


class InputChanged(PipelineError):
    """A file another stage produced differs from what that stage recorded (one line: the file, the stage, the fix)."""


def rerun_hint(key: str, entry: dict | None = None) -> str:
    """`stage=sft method=eksft` / `stage=rl init=eksft` / `stage=split`: how to re-run the entry `key`."""
    stage, _, tag = key.partition("/")
    if not tag:
        return f"stage={stage}"
    if tag.startswith("path-"):
        return f"stage={stage} init=<the same path> (entry {key})"
    if stage == "sft":
        return f"stage=sft method={tag}"
    return f"stage={stage} init={tag}"


def config_hash(config: Any) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def resolve_recorded(run_dir: str | os.PathLike, path: str) -> str:
    """A recorded path as an absolute path: relative ones are relative to `run_dir`."""
    p = Path(path)
    return str(p if p.is_absolute() else Path(run_dir).resolve() / p)


def self_start_time() -> int | None:
    from eksft_pipeline.contract.procs import start_time

    return start_time(os.getpid())


class Manifest:
    """Read-modify-write access to `<run_dir>/manifest.json`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.path = self.run_dir / "manifest.json"
        self.backup = self.run_dir / "manifest.json.bak"
        self._lock_path = self.run_dir / ".manifest.lock"
        self.hashes = HashCache(self.run_dir / ".hash_cache.json")

    # -- paths and hashes -------------------------------------------------------------------------
    def record_path(self, path: str | os.PathLike) -> str:
        """How a path is written into the manifest: relative inside the run dir, absolute outside it
        (hub names and other non-paths that do not exist are kept as given)."""
        p = Path(str(path)).expanduser()
        if not p.is_absolute():
            if not p.exists():
                return str(path)
            p = p.absolute()
        try:
            return Path(os.path.normpath(p)).relative_to(self.run_dir).as_posix() or "."
        except ValueError:
            pass
        with contextlib.suppress(OSError, ValueError):
            return p.resolve().relative_to(self.run_dir).as_posix() or "."
        return str(Path(os.path.normpath(p)))

    def resolve(self, recorded: str) -> str:
        return resolve_recorded(self.run_dir, recorded)

    def hash(self, path: str | os.PathLike) -> str | None:
        try:
            return hash_path(path, self.hashes)
        finally:
            self.hashes.save()

    def _matches(self, path: str, recorded: str | None) -> bool:
        if recorded and recorded.startswith(("dir:", "fp:")):
            return _legacy_hash(Path(path)) == recorded
        return self.hash(path) == recorded

    def record(self, path: str | os.PathLike) -> dict:
        """What the manifest records of an output: path, content hash, and what `changed_file` needs to name the
        one file that changed (per-file sha256 of a directory, fingerprints of large files)."""
        p = Path(path)
        rec: dict[str, Any] = {"path": self.record_path(path), "hash": self.hash(path)}
        try:
            if p.is_file():
                if p.stat().st_size >= CACHE_MIN_BYTES:
                    rec["fingerprint"] = fingerprint_file(p)
            elif p.is_dir():
                files = sorted(q for q in p.rglob("*") if q.is_file())
                if len(files) <= 1000:
                    rec["files"] = {f.relative_to(p).as_posix(): self.hashes.sha256(f) for f in files}
                    fps = {f.relative_to(p).as_posix(): fingerprint_file(f) for f in files
                           if f.stat().st_size >= CACHE_MIN_BYTES}
                    if fps:
                        rec["fingerprints"] = fps
        finally:
            self.hashes.save()
        return rec

    def changed_file(self, rec: dict) -> tuple[str, str] | None:
        """(absolute path of the first file that differs from the record `rec`, how), or None when intact."""
        path = Path(self.resolve(rec["path"]))
        recorded = rec.get("hash")
        if recorded is None:
            return None
        if not path.exists():
            return str(path), "is missing"
        if recorded.startswith(("dir:", "fp:")):
            return None if _legacy_hash(path) == recorded else (str(path), "changed")
        try:
            if path.is_file():
                fp = rec.get("fingerprint")
                if fp and fingerprint_file(path) != fp:
                    return str(path), "changed"
                return None if "sha256:" + self.hashes.sha256(path) == recorded else (str(path), "changed")
            files = rec.get("files")
            if files is None:  # recorded before per-file records: the directory is all that can be named
                return None if hash_path(path, self.hashes) == recorded else (str(path), "changed")
            now = {f.relative_to(path).as_posix(): f for f in path.rglob("*") if f.is_file()}
            for rel in sorted(files):
                if rel not in now:
                    return str(path / rel), "is missing"
            fps = rec.get("fingerprints") or {}
            for rel in sorted(fps):
                if fingerprint_file(now[rel]) != fps[rel]:
                    return str(path / rel), "changed"
            for rel in sorted(files):
                if self.hashes.sha256(now[rel]) != files[rel]:
                    return str(path / rel), "changed"
            extra = sorted(set(now) - set(files))
            if extra:
                return str(path / extra[0]), "appeared"
            return None
        finally:
            self.hashes.save()

    def verify_inputs(self, key: str, inputs: dict[str, str]) -> None:
        """Every input that a complete entry recorded as its output must still be what that entry recorded.

        On a mismatch: every complete entry recording the file becomes `stale` (so nothing trusts it until its
        producer re-ran), and InputChanged names the file and the producer -- the entry whose folder holds it."""
        stages = self.read()["stages"]
        for name, path in inputs.items():
            rec_in = self.record_path(path)
            holders = []
            for k, e in stages.items():
                if k == key or e.get("status") != "complete":
                    continue
                for out in (e.get("outputs") or {}).values():
                    op = str(out.get("path", ""))
                    if op and (rec_in == op or rec_in.startswith(op.rstrip("/") + "/")):
                        holders.append((k, out))
            bad = [(k, c) for k, out in holders if (c := self.changed_file(out)) is not None]
            if not bad:
                continue
            keys = [k for k, _ in bad]
            # the producer: the entry whose own folder holds the file (the handoff only points at the SFT model)
            owner = next((k for k, o in holders if str(o["path"]).startswith(k + "/")), keys[0])
            file, how = dict(bad).get(owner, bad[0][1])
            reason = f"file {file} {how} after it completed"
            with self._locked():
                data = self.read()
                for h in dict.fromkeys([owner, *keys]):
                    e = data["stages"].get(h)
                    if e is not None and e.get("status") == "complete":
                        e["status"] = "stale"
                        e["stale_reason"] = reason
                self._write(data)
            raise InputChanged(f"file {file} {how} since stage {owner} completed (input {name!r} of {key}); "
                               f"re-run {rerun_hint(owner)} (nothing was deleted)")

    def stage_hash(self, config: Any, inputs: dict[str, str]) -> str:
        """What decides whether a stage's results are current: its config and the content of its inputs."""
        return config_hash({"config": config, "inputs": {k: self.hash(v) for k, v in inputs.items()}})

    # -- low level ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _load(path: Path) -> dict:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise ValueError("no 'stages' mapping")
        return data

    def read(self) -> dict:
        if not self.path.exists() and not self.backup.exists():
            return {"version": 2, "stages": {}}
        try:
            return self._load(self.path)
        except (OSError, ValueError) as e:
            err = e
        try:
            data = self._load(self.backup)
        except (OSError, ValueError):
            raise RuntimeError(
                f"{self.path} is unreadable ({type(err).__name__}: {err}) and so is its backup; "
                f"move both away (mv {self.path} {self.path}.broken) to start this run directory afresh"
            ) from err
        print(f"[eksft-pipeline] warning: {self.path} is unreadable ({type(err).__name__}); "
              f"using the previous version {self.backup.name}", flush=True)
        return data

    def _write(self, data: dict) -> None:
        tmp = self.path.with_name(f"manifest.json.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True, default=str)
                f.flush()
                os.fsync(f.fileno())
            if self.path.exists():  # keep the previous version: link it to .bak atomically
                bak_tmp = self.backup.with_name(f"manifest.json.bak.{os.getpid()}.tmp")
                with contextlib.suppress(OSError):
                    bak_tmp.unlink()
                try:
                    os.link(self.path, bak_tmp)
                    os.replace(bak_tmp, self.backup)
                except OSError:
                    with contextlib.suppress(OSError):
                        bak_tmp.unlink()
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._sweep_tmp()

    def _sweep_tmp(self) -> None:
        """Leftover temporaries of killed writers (never read; removed so they cannot pile up)."""
        from eksft_pipeline.contract.procs import alive

        for f in self.run_dir.glob("manifest.json*.tmp"):
            parts = f.name.split(".")
            pid = parts[-2] if len(parts) >= 3 and parts[-2].isdigit() else None
            if pid is None or (int(pid) != os.getpid() and not alive(int(pid))):
                with contextlib.suppress(OSError):
                    f.unlink()

    def update(self, key: str, **fields) -> dict:
        with self._locked():
            data = self.read()
            entry = data["stages"].setdefault(key, {})
            entry.update(fields)
            self._write(data)
            return entry

    def meta(self, name: str, default=None):
        """A top-level value of the run directory (e.g. `tracking_group`); `default` (a callable) creates and
        records it once, under the lock, so concurrent stages of one sweep agree on it."""
        with self._locked():
            data = self.read()
            if name not in data and callable(default):
                data[name] = default()
                self._write(data)
            return data.get(name)

    def entry(self, key: str) -> dict | None:
        return self.read()["stages"].get(key)

    # -- stage lifecycle --------------------------------------------------------------------------
    def is_complete(self, key: str, cfg_hash: str) -> tuple[bool, str]:
        """(complete?, reason) -- reason says why a stage must run."""
        e = self.entry(key)
        if e is None:
            return False, "never run"
        if e.get("status") == "stale":
            return False, f"stale: {e.get('stale_reason', 'an upstream stage re-ran')}"
        if e.get("status") == "running":
            return False, "last attempt interrupted (still marked running)"
        if e.get("status") != "complete":
            return False, f"last attempt {e.get('status', 'unknown')}"
        if e.get("config_hash") != cfg_hash:
            return False, "config or inputs changed since the completed run"
        for name, out in (e.get("outputs") or {}).items():
            path = self.resolve(out["path"])
            if not Path(path).exists():
                return False, f"output {name!r} missing: {path}"
            if not self._matches(path, out.get("hash")):
                return False, f"output {name!r} changed on disk: {path}"
        return True, "complete"

    def _dependents(self, stages: dict, key: str) -> list[str]:
        """Entries that consumed (transitively) the outputs or the folder of `key`."""

        def produced(k: str) -> list[str]:
            """The stage's folder, and outputs outside the run dir (the tiny assets). An output that lies in
            ANOTHER stage's folder (the handoff's `model` is the SFT output) is a pointer, not a product."""
            outs = [str(o["path"]) for o in ((stages.get(k) or {}).get("outputs") or {}).values()]
            return [k] + [o for o in outs if Path(o).is_absolute()]

        def uses(e: dict, prods: list[str]) -> bool:
            for i in (e.get("inputs") or {}).values():
                p = str(i.get("path", ""))
                if any(p == q or p.startswith(q.rstrip("/") + "/") for q in prods):
                    return True
            return False

        out: list[str] = []
        todo = [key]
        while todo:
            k = todo.pop()
            prods = produced(k)
            for other, e in stages.items():
                if other != key and other not in out and uses(e, prods):
                    out.append(other)
                    todo.append(other)
        return out

    def start(self, key: str, config: Any, cfg_hash: str, inputs: dict[str, str], *, run_token: str = "",
              live_owner=None) -> list[str]:
        """Claim `key` for a new attempt (status `running`, owned by `run_token`); returns the complete entries now
        marked stale because they used its outputs (a failed or running one is not a result to invalidate).

        The check and the claim happen inside one lock: `live_owner(entry)` (if given) is called with the current
        entry under the lock and raises when another live attempt owns it -- two runs started in the same second
        cannot both pass."""
        recorded_inputs = {k: {"path": self.record_path(v), "hash": self.hash(v)} for k, v in inputs.items()}
        with self._locked():
            data = self.read()
            stages = data["stages"]
            if live_owner is not None:
                live_owner(stages.get(key))
            stale = [k for k in self._dependents(stages, key) if stages[k].get("status") == "complete"]
            for other in stale:
                stages[other]["status"] = "stale"
                stages[other]["stale_reason"] = f"upstream {key} re-ran at {_now()}"
            prev = stages.get(key) or {}
            stages[key] = {
                "status": "running", "config": config, "config_hash": cfg_hash, "inputs": recorded_inputs,
                "outputs": {}, "summary": {}, "started": _now(), "finished": None, "pid": os.getpid(),
                "pid_start": self_start_time(), "host": socket.gethostname(), "run_token": run_token,
                "error": None, "attempts": int(prev.get("attempts", 0)) + 1,
            }  # fmt: skip
            self._write(data)
        return stale

    def update_owned(self, key: str, run_token: str | None, **fields) -> bool:
        """`update`, only while `run_token` still owns the entry (None: unconditionally); False when it does not."""
        with self._locked():
            data = self.read()
            entry = data["stages"].get(key)
            if run_token is not None and (entry is None or entry.get("run_token") != run_token):
                return False
            data["stages"].setdefault(key, {}).update(fields)
            self._write(data)
            return True

    def complete(self, key: str, outputs: dict[str, str], summary: dict | None = None, *,
                 run_token: str | None = None) -> list[str]:
        """Record the outputs; returns the stale entries that are current again (see `revalidate`). With
        `run_token`, only while that attempt still owns the entry (else RuntimeError: nothing is recorded)."""
        missing = [f"{k}={v}" for k, v in outputs.items() if not Path(v).exists()]
        if missing:
            raise RuntimeError(f"stage {key} finished but its outputs are missing: {', '.join(missing)}")
        recorded = {k: self.record(v) for k, v in outputs.items()}
        if not self.update_owned(key, run_token, status="complete", outputs=recorded, summary=summary or {},
                                 finished=_now()):
            raise RuntimeError(f"stage {key} finished, but another attempt owns its manifest entry now; "
                               "its result is not recorded")
        return self.revalidate()

    def _current(self, e: dict) -> bool:
        """Its recorded inputs and outputs are exactly the files on disk now."""
        for rec in [*(e.get("inputs") or {}).values(), *(e.get("outputs") or {}).values()]:
            path = self.resolve(rec["path"])
            if rec.get("hash") is None:
                if Path(path).exists():
                    return False
            elif not Path(path).exists() or not self._matches(path, rec["hash"]):
                return False
        return True

    def revalidate(self) -> list[str]:
        """`stale` entries whose inputs turned out identical (an upstream re-run that reproduced its files
        byte for byte, e.g. a deterministic split, or a re-export from the same checkpoint) are complete again:
        "complete" means "these outputs, made from these inputs", and both are on disk unchanged."""
        restored: list[str] = []
        with self._locked():
            data = self.read()
            changed = True
            while changed:
                changed = False
                for k, e in data["stages"].items():
                    if e.get("status") == "stale" and e.get("outputs") and self._current(e):
                        e["status"] = "complete"
                        e.pop("stale_reason", None)
                        restored.append(k)
                        changed = True
            if restored:
                self._write(data)
        return restored

    def fail(self, key: str, error: str, *, status: str = "failed", run_token: str | None = None) -> bool:
        """Record a failed (or `killed`) attempt -- with `run_token`, only while that attempt owns the entry
        (returns False, writing nothing, when another attempt does). Raises OSError if the manifest cannot be
        written."""
        return self.update_owned(key, run_token, status=status, error=error[-4000:], finished=_now())

    def outputs(self, key: str) -> dict[str, str]:
        """Absolute output paths of a COMPLETE stage (raises with a clear message otherwise)."""
        e = self.entry(key)
        if e is None or e.get("status") != "complete":
            state = "never run" if e is None else e.get("status")
            if e is not None and state == "stale":
                state = f"stale, {e.get('stale_reason', 'an upstream stage re-ran')}"
            raise FileNotFoundError(
                f"stage {key!r} has no complete output in {self.run_dir} (status: {state}); run it first"
            )
        return {k: self.resolve(v["path"]) for k, v in e["outputs"].items()}
