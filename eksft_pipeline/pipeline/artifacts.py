"""Files and processes the training stages share: a tee'd subprocess, verl checkpoints -> HF dirs.

Lives in `pipeline/` so that the SFT and RL stages use the same code without importing each other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path


def tee(
    cmd: list[str],
    env: dict,
    log_path: Path,
    cwd: str | None = None,
    *,
    watchdog: Callable[[], str | None] | None = None,
    poll_s: float = 5.0,
) -> int:
    """Run `cmd`, streaming its output to our stdout and to `log_path`. Returns the exit code.

    `watchdog`, if given, is polled every `poll_s` seconds while the process runs; when it returns
    a message, the process group is killed, the message is logged, and `StalledRun` is raised
    (used by the RL stage: verl's dynamic sampling can loop forever on a policy whose groups are
    all right or all wrong).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        assert proc.stdout is not None
        stalled: list[str] = []
        stop = threading.Event()

        def _watch():
            while not stop.wait(poll_s):
                msg = watchdog()
                if msg:
                    stalled.append(msg)
                    _kill_group(proc)
                    return

        watcher = threading.Thread(target=_watch, daemon=True) if watchdog is not None else None
        if watcher is not None:
            watcher.start()
        try:
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                log.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            stop.set()
        rc = proc.wait()
        if stalled:
            log.write(f"\n[eksft_pipeline] killed: {stalled[0]}\n".encode())
            raise StalledRun(stalled[0])
        return rc


class StalledRun(RuntimeError):
    """A watched subprocess made no progress and was killed."""


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the process and everything it started (Ray workers of a verl run included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""



def latest_checkpoint(ckpt_root: Path) -> Path:
    tracker = ckpt_root / "latest_checkpointed_iteration.txt"
    if not tracker.exists():
        raise FileNotFoundError(f"no checkpoint tracker {tracker}: verl saved no checkpoint")
    step = int(tracker.read_text().strip())
    path = ckpt_root / f"global_step_{step}"
    if not path.is_dir():
        raise FileNotFoundError(f"tracker points at {path}, which does not exist")
    return path


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_hf_model(ckpt_root: Path, dst: Path, *, base_model: str, subdir: str = "huggingface") -> Path:
    """Last checkpoint's `huggingface/` -> `dst` (hard links when possible), completed and checked.

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
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            _link_or_copy(f, tmp / f.name)
    # generation config / chat template from the base model when verl did not write them
    from eksft_pipeline.models.hub import resolve_model_dir

    try:
        base = resolve_model_dir(base_model)
    except FileNotFoundError:
        base = None
    if base is not None:
        for name in ("generation_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "vocab.json", "merges.txt"):
            if not (tmp / name).exists() and (base / name).exists():
                shutil.copy2(base / name, tmp / name)
    _check_hf_dir(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    (dst / "EXPORTED_FROM").write_text(str(ckpt) + "\n")
    return dst


def _check_hf_dir(d: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"exported model {d} has no chat template")
    if tok.eos_token is None:
        raise ValueError(f"exported model {d} has no EOS token")
