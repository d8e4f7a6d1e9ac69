"""Resolve a model reference (local directory or HF hub name) to a local directory, offline-safe."""

from __future__ import annotations

from pathlib import Path


def resolve_model_dir(ref: str, *, allow_download: bool = False) -> Path:
    """A local directory for `ref`: the path itself, or the hub snapshot already in the HF cache.

    With `allow_download=False` (the default: stages never download at run time unless the user
    asked for it) a hub name that is not cached raises FileNotFoundError naming it.
    """
    p = Path(str(ref)).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.suffix or str(ref).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory not found: {ref}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(ref), local_files_only=not allow_download))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise FileNotFoundError(
            f"model {ref!r} is neither a local directory nor in the local HF cache "
            f"({type(e).__name__}); download it first (huggingface-cli download {ref})"
        ) from e
