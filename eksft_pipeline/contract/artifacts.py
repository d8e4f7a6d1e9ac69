"""Files and processes the training stages share: a logged subprocess, atomic writes, verl checkpoints -> HF dirs.

Lives in `contract/` (below the stages) so that the SFT and RL stages use the same code without importing each other.

* `tee` runs verl (its Ray SFT driver / main_ppo) with its FULL output in the stage's log file (progress bars as one
  line per update, not one giant line) and a short console view: `StepProgress` turns verl's
  `step:N - key:value - ...` lines into `[rl/eksft] step 3/8  score -1.62  73.1 s/step  ETA 6m05s`.
* `atomic_path` / `atomic_write_text` / `atomic_write_json`: write to a temporary name in the same folder,
  fsync, rename -- a kill never leaves a half-written file under the final name.
* `export_hf_model` copies the last checkpoint's HF directory into `hf_model/` (checked, atomically swapped);
  `check_resume_point` makes sure verl's `latest_checkpointed_iteration.txt` can be trusted before a resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from eksft_pipeline.contract.stage_api import PipelineError


@contextlib.contextmanager
def quiet():
    """verl prints and warns while its config is validated (platform probing, optional engines); the
    console is for the pipeline's own lines. Errors still propagate as exceptions."""
    import io
    import logging
    import warnings

    buf = io.StringIO()
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(prev)


# -- atomic writes -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj, **kw) -> None:
    atomic_write_text(path, json.dumps(obj, **kw))


def is_temporary(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


# -- logged subprocess ---------------------------------------------------------------------------------
_ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\((?:[\w.]+ )?pid=\d+(?:, ip=[\d.]+)?\)\s*")
_STEP = re.compile(r"(?<![\w/])step:(\d+) - (.*)")
_KV = re.compile(r"([\w/@.\-]+):(-?[\d.]+(?:e[-+]?\d+)?)(?=\s|$)")
_TOTAL = re.compile(r"Total (?:training )?steps:? (\d+)")
_BAR = re.compile(r"\|\s*(\d+)/(\d+) \[")
_EPOCH = re.compile(r"Epoch \d+/(\d+)")
_CKPT = re.compile(r"Saving checkpoint to:? (\S+)")


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StepProgress:
    """Console view of a verl run: one line per training step (step/total, chosen metrics, s/step, ETA) and one
    per checkpoint; everything else stays in the log file."""

    def __init__(self, key: str, metrics: dict[str, str], total: int | None = None):
        self.key, self.metrics, self.total = key, metrics, total
        self.t_first: float | None = None
        self.first_step: int | None = None
        self.last_step: int | None = None

    def __call__(self, line: str) -> str | None:
        line = _RAY_PREFIX.sub("", line.strip())
        m = _STEP.search(line)
        if m is None:
            bar = _BAR.search(line) if ("Epoch" in line or "Training Progress" in line) else None
            if self.total is None and (t := _TOTAL.search(line) or bar):
                self.total = int(t.group(t.lastindex))
                if t is bar and (e := _EPOCH.search(line)):  # verl's per-epoch bar: steps of one epoch
                    self.total *= int(e.group(1))
            if c := _CKPT.search(line):
                return f"[{self.key}] checkpoint {Path(c.group(1)).name}"
            return None
        step = int(m.group(1))
        kv = dict(_KV.findall(m.group(2)))
        now = time.monotonic()
        parts = [f"[{self.key}] step {step}" + (f"/{self.total}" if self.total else "")]
        for label, k in self.metrics.items():
            if k in kv:
                parts.append(f"{label} {float(kv[k]):.4g}")
        if self.t_first is None:
            self.t_first, self.first_step = now, step
        elif step > self.first_step:
            rate = (now - self.t_first) / (step - self.first_step)
            parts.append(f"{rate:.1f} s/step")
            if self.total and self.total > step:
                parts.append(f"ETA {_fmt_s(rate * (self.total - step))}")
        self.last_step = step
        return "  ".join(parts)


def tee(
    cmd: list[str],
    env: dict,
    log_path: Path,
    cwd: str | None = None,
    *,
    watchdog: Callable[[], str | None] | None = None,
    poll_s: float = 5.0,
    progress: Callable[[str], str | None] | None = None,
    heartbeat_s: float = 120.0,
) -> int:
    """Run `cmd`, its whole output going to `log_path`; return the exit code.

    Console: every line when `progress` is None; otherwise only what `progress(line)` returns (e.g. a
    `StepProgress`), plus a heartbeat line when nothing was shown for `heartbeat_s`.

    Processes: when `env` carries the orchestrator's run token (contract/procs.py) the command stays in the
    orchestrator's process group -- a `kill -9` of the group reaches it -- and everything it starts (Ray
    included) is found and ended by that token; without a token it gets a session of its own and is ended
    through that process group. Either way an exception here (Ctrl-C, SIGTERM) ends the whole tree first.

    `watchdog`, if given, is polled every `poll_s` seconds while the process runs; when it returns a
    message, the process tree is ended, the message is logged, and `StalledRun` is raised (used by the RL
    stage: verl's dynamic sampling can loop forever on a policy whose groups are all right or all wrong).
    """
    from eksft_pipeline.contract import procs

    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**env, "PYTHONUNBUFFERED": env.get("PYTHONUNBUFFERED") or "1"}  # the log is complete up to a crash
    tracked = bool(env.get(procs.ENV_TOKEN)) and sys.platform.startswith("linux")
    match = {procs.ENV_TOKEN: env[procs.ENV_TOKEN]} if tracked else {}
    if tracked and env.get(procs.ENV_STAGE):
        match[procs.ENV_STAGE] = env[procs.ENV_STAGE]
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=not tracked
        )
        assert proc.stdout is not None

        def kill_tree() -> None:
            if tracked:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                procs.end_processes(match, grace_s=5.0)
            else:
                _kill_group(proc)
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)

        stalled: list[str] = []
        stop = threading.Event()
        shown = {"t": time.monotonic(), "last": ""}
        t_start = time.monotonic()
        say_lock = threading.Lock()

        def say(text: str) -> None:
            with say_lock:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
                shown["t"] = time.monotonic()

        def _watch():
            while not stop.wait(poll_s):
                if watchdog is not None:
                    msg = watchdog()
                    if msg:
                        stalled.append(msg)
                        kill_tree()
                        return
                if progress is not None and time.monotonic() - shown["t"] > heartbeat_s:
                    say(f"    ... still running ({_fmt_s(time.monotonic() - t_start)}); last log line: "
                        f"{shown['last'][:100]!r}; full output: {log_path}")

        watcher = threading.Thread(target=_watch, daemon=True)
        watcher.start()
        try:
            _copy_output(proc.stdout, log, say, shown, progress)
        except BaseException:
            kill_tree()
            raise
        finally:
            stop.set()
        rc = proc.wait()
        if stalled:
            log.write(f"\n[eksft_pipeline] killed: {stalled[0]}\n".encode())
            raise StalledRun(stalled[0])
        return rc


def _copy_output(stdout, log, say: Callable[[str], None], shown: dict, progress) -> None:
    """Every byte of `stdout` into `log` (a progress bar's '\r' redraws as lines of their own); each line to the
    console through `say` (all of them, or what `progress(line)` returns); the last non-empty line in `shown`."""
    pending = b""
    for chunk in iter(lambda: stdout.read1(65536), b""):
        # progress bars redraw with '\r': one log line per redraw instead of one giant line
        chunk = pending + chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, pending = chunk.split(b"\n")
        if lines:
            log.write(b"\n".join(lines) + b"\n")
            log.flush()
        for raw in lines:
            text = _ANSI.sub(b"", raw).decode(errors="replace")
            if text.strip():
                shown["last"] = text.strip()
            if progress is None:
                say(text)
            elif (msg := progress(text)) is not None:
                say(msg)
    if pending:
        log.write(pending + b"\n")
        if progress is None:
            say(_ANSI.sub(b"", pending).decode(errors="replace"))


class StalledRun(PipelineError):
    """A watched subprocess made no progress and was killed."""


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the process and everything in its session's process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


# prefixes launchers put in front of a child's lines: torchrun's `[rank0]:`, Ray's `(TaskRunner pid=1)`, timestamps
_LINE_PREFIX = re.compile(r"^(?:\[(?:rank|default)\d*\]:\s?|\((?:[\w.]+ )?pid=\d+(?:, ip=[\d.]+)?\)\s?)+")
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+)')
_EXC = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Failure|error)|[A-Za-z_][\w.]*)"
                  r"(?::\s?(.*))?$")
# wrappers that report ANOTHER process's failure: never the cause when a real exception is in the log
_WRAPPERS = ("ChildFailedError", "RayTaskError", "RayActorError", "ActorDiedError", "WorkerCrashedError",
             "ActorUnavailableError", "RaySystemError", "SystemExit", "KeyboardInterrupt", "CalledProcessError")
_PATH_IN_TEXT = re.compile(r"(/[^\s'\"():,]+)")


def first_exception(text: str) -> dict | None:
    """The FIRST real exception of a subprocess log (torchrun, verl, Ray, any Python program): the exception line
    of the first traceback whose type is not a wrapper of another process's failure (torchrun's ChildFailedError,
    Ray's RayTaskError, ...), with the innermost frame of that traceback and a file path the message names.

    Returns {"exception": "Type: message", "frame": "file:line", "file": path-in-the-message or None,
    "line_no": 1-based line of the log} or None when the log holds no traceback."""
    lines = [_LINE_PREFIX.sub("", ln.rstrip()) for ln in text.splitlines()]
    found = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("Traceback (most recent call last):"):
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        frame = None
        j = i + 1
        while j < len(lines):
            ln = lines[j]
            m = _FRAME.match(ln)
            if m:
                frame = f"{m.group(1)}:{m.group(2)}"
                j += 1
                continue
            body = ln[indent:] if len(ln) - len(ln.lstrip()) >= indent else ln.lstrip()
            if body and not body.startswith((" ", "\t", "~", "^")) and _EXC.match(body):
                exc = _EXC.match(body)
                name = exc.group(1).rsplit(".", 1)[-1]
                msg = (exc.group(2) or "").strip()
                # a message that continues on the following unindented lines (pyarrow, safetensors): first line only
                found.append({"type": name, "exception": f"{name}: {msg}" if msg else name, "frame": frame,
                              "line_no": j + 1, "text": body})
                break
            j += 1
        i = j + 1
    if not found:
        return None
    real = [f for f in found if f["type"] not in _WRAPPERS] or found
    hit = real[0]
    paths = [p for p in _PATH_IN_TEXT.findall(hit["text"]) if not p.endswith(".py")]
    hit["file"] = paths[0] if paths else None
    return {k: hit[k] for k in ("exception", "frame", "file", "line_no")}


def log_cause(log_path: Path) -> str | None:
    """One line: the first real exception in `log_path` (see `first_exception`), where it was raised, and the
    file its message names; None when the log has no traceback."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    hit = first_exception(text)
    if hit is None:
        return None
    exc = hit["exception"]
    if len(exc) > 300:
        exc = exc[:297] + "..."
    where = []
    if hit["file"]:
        where.append(f"file {hit['file']}")
    if hit["frame"]:
        where.append(f"raised at {hit['frame']}")
    where.append(f"log line {hit['line_no']}")
    return f"{exc} ({'; '.join(where)})"


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def read_metric_logs(log_dir: Path) -> tuple[dict[int, dict], int]:
    """step -> metrics from verl's file logger (`metrics-*.jsonl`, one file per attempt), merged over attempts
    (a later attempt's value for a step wins), and the number of unreadable lines skipped (a line cut short
    by a kill is a leftover, not a reason to fail)."""
    steps: dict[int, dict] = {}
    bad = 0
    for f in sorted(log_dir.glob("metrics-*.jsonl")):
        for line in f.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                steps.setdefault(int(rec["step"]), {}).update(rec["data"])
            except (ValueError, KeyError, TypeError):
                bad += 1
    return dict(sorted(steps.items())), bad


# -- checkpoints -> HF model -----------------------------------------------------------------------------
TRACKER = "latest_checkpointed_iteration.txt"


def latest_checkpoint(ckpt_root: Path) -> Path:
    tracker = ckpt_root / TRACKER
    if not tracker.exists():
        raise FileNotFoundError(f"no checkpoint tracker {tracker}: verl saved no checkpoint")
    step = int(tracker.read_text().strip())
    path = ckpt_root / f"global_step_{step}"
    if not path.is_dir():
        raise FileNotFoundError(f"tracker points at {path}, which does not exist")
    return path


def check_resume_point(ckpt_root: Path) -> str | None:
    """Make verl's `resume_mode=auto` safe after a kill; returns what was done (None: nothing to do).

    verl resumes from `global_step_<latest_checkpointed_iteration.txt>` and writes the tracker after a
    checkpoint's files. So: an unreadable tracker or one pointing at a missing folder -> start afresh (the
    folder is removed); checkpoint folders newer than the tracker (a kill during a save) -> removed.
    """
    if not ckpt_root.is_dir():
        return None
    tracker = ckpt_root / TRACKER
    dirs = {int(d.name.rsplit("_", 1)[1]): d for d in ckpt_root.glob("global_step_*")
            if d.is_dir() and d.name.rsplit("_", 1)[1].isdigit()}
    step = None
    if tracker.exists():
        with contextlib.suppress(ValueError, OSError):
            step = int(tracker.read_text().strip())
        if step is None or step not in dirs:
            shutil.rmtree(ckpt_root)
            return f"checkpoint tracker {tracker} is unreadable or points at a missing folder: starting afresh"
    partial = sorted(n for n in dirs if step is None or n > step)
    for n in partial:
        shutil.rmtree(dirs[n])
    if partial:
        return f"removed {len(partial)} checkpoint folder(s) a kill left half-written: {partial}"
    return None


DONE_MARKER = "TRAINING_COMPLETE.json"


def mark_training_done(ckpt_root: Path) -> None:
    """After verl exited 0: remember that training under THIS config finished at the tracker's step (the runner
    removes `checkpoints/` whenever the config changes, so the marker never outlives its config)."""
    step = int(latest_checkpoint(ckpt_root).name.rsplit("_", 1)[1])
    atomic_write_json(ckpt_root / DONE_MARKER, {"step": step})


def training_done(ckpt_root: Path) -> int | None:
    """The final step if a previous attempt with this config finished training (e.g. it was killed while
    exporting, or an exported file was damaged): then only the export is redone, verl is not relaunched --
    relaunching it on a finished checkpoint costs its whole start-up, and verl 0.9.1's SFT trainer even trains
    one step past the end when the last step is not an epoch boundary."""
    try:
        step = int(json.loads((ckpt_root / DONE_MARKER).read_text())["step"])
        return step if int(latest_checkpoint(ckpt_root).name.rsplit("_", 1)[1]) == step else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_safetensors(path: Path) -> None:
    """A safetensors file is complete: its header parses and the file is as long as the header says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{path} is not a complete safetensors file ({e}); delete it to have it rebuilt") from e
    if 8 + n + end != size:
        raise PipelineError(f"{path} is truncated or padded ({size} bytes, header says {8 + n + end}); "
                            "delete it to have it rebuilt")


def export_hf_model(ckpt_root: Path, dst: Path, *, base_dir: Path | None, subdir: str = "huggingface") -> Path:
    """Last checkpoint's `huggingface/` -> `dst` (a copy, never hard links: the output must not share bytes
    with a checkpoint that a later resume or a user might rewrite), completed, checked and swapped in
    atomically (a temporary folder renamed over `dst`).

    verl writes weights + config + tokenizer there when `checkpoint.save_contents` has `hf_model`.
    If only FSDP shards exist (hf_model not saved), the handoff stage merges them instead; here we
    fail with that advice.
    """
    ckpt = latest_checkpoint(ckpt_root)
    src = ckpt / subdir
    weights = list(src.glob("*.safetensors")) + list(src.glob("pytorch_model*.bin"))
    if not weights:
        raise FileNotFoundError(
            f"{src} has no weights: add hf_model to checkpoint.save_contents, or merge the FSDP shards "
            f"with `python -m verl.model_merger merge --backend fsdp --local_dir {ckpt} --target_dir {dst}`"
        )
    for w in weights:
        if w.suffix == ".safetensors":
            check_safetensors(w)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    # generation config / chat template from the base model (`base_dir`, the run's recorded directory) when verl
    # did not write them
    base = None if base_dir is None else Path(base_dir)
    if base is not None:
        for name in ("generation_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "vocab.json", "merges.txt"):
            if not (tmp / name).exists() and (base / name).exists():
                shutil.copy2(base / name, tmp / name)
    _check_hf_dir(tmp)
    (tmp / "EXPORTED_FROM").write_text(os.path.relpath(ckpt, dst.parent) + "\n")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old.exists():
        shutil.rmtree(old)
    return dst


def _check_hf_dir(d: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"exported model {d} has no chat template")
    if tok.eos_token is None:
        raise ValueError(f"exported model {d} has no EOS token")
    for w in d.glob("*.safetensors"):
        check_safetensors(w)
