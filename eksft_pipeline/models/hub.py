"""Resolve a model reference (local directory or HF hub name, optionally pinned) to a local directory, offline-safe.

Pinned revisions: a hub name may carry ``@<revision>`` (a commit, tag or branch: ``Qwen/Qwen3-8B@<commit>``), or the
model recipe a ``revision:`` key. :func:`pin_model_revision` (called by the orchestrator before any stage) resolves a
pinned model to the snapshot directory of exactly that revision and puts that directory in ``model.path``, so every
loader -- transformers, verl's ``model.path``, vLLM -- reads the same files; the commit it resolved to is recorded
(``model.revision_resolved``; the assets stage writes it to the manifest). An unpinned hub name is passed on as it
is (the loaders take the hub's head) and the model card says "unpinned". Dataset sources take ``@<revision>`` the
same way (data/split.py passes it to ``datasets.load_dataset``).
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, open_dict

_REV = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)@([\w./-]+)$")


def split_revision(ref: str) -> tuple[str, str | None]:
    """``owner/name@rev`` -> (``owner/name``, ``rev``); anything else (a local path, a plain name) -> (ref, None)."""
    text = str(ref)
    if Path(text).expanduser().exists():
        return text, None
    m = _REV.match(text)
    return (m.group(1), m.group(2)) if m else (text, None)


def resolve_model_dir(ref: str, *, revision: str | None = None, allow_download: bool = False) -> Path:
    """A local directory for `ref`: the path itself, or the hub snapshot (of `revision` or ``ref``'s ``@rev``)
    already in the HF cache.

    With `allow_download=False` (the default: stages never download at run time unless the user
    asked for it) a hub name that is not cached raises FileNotFoundError naming it.
    """
    p = Path(str(ref)).expanduser()
    if p.is_dir():
        return p.resolve()
    name, rev = split_revision(str(ref))
    rev = revision or rev
    if Path(name).suffix or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory not found: {ref}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=rev, local_files_only=not allow_download))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise FileNotFoundError(
            f"model {name!r}{f' at revision {rev!r}' if rev else ''} is neither a local directory nor in the local HF "
            f"cache ({type(e).__name__}); download it first (hf download {name}{f' --revision {rev}' if rev else ''})"
        ) from e


def cached_revision(name: str, revision: str | None = None, *, repo_type: str = "model") -> str | None:
    """The commit the local HF cache holds for ``name`` at ``revision`` (None when it is not cached)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, repo_type=repo_type, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached / offline: unknown
        return None


def pin_model_revision(cfg: DictConfig, *, offline: bool) -> DictConfig:
    """A pinned hub model (``model.path=owner/name@rev`` or ``model.revision``) -> ``model.path`` = the snapshot
    directory of that revision, ``model.hub_name`` / ``model.revision`` / ``model.revision_resolved`` (the commit)
    recorded. Downloads the snapshot unless ``offline``; a dry run is left alone. ValueError (one line) when the
    revision cannot be had. Unpinned names and local directories are returned unchanged."""
    m = cfg.model
    if str(m.get("kind")) != "hf" or cfg.get("dry_run"):
        return cfg
    name, rev = split_revision(str(m.path))
    rev = m.get("revision") or rev
    if not rev or Path(name).expanduser().exists():
        return cfg
    try:
        d = resolve_model_dir(name, revision=str(rev), allow_download=not offline)
    except FileNotFoundError as e:
        raise ValueError(f"model.path={m.path}: {e}") from None
    with open_dict(cfg):
        cfg.model.path = str(d)
        cfg.model.hub_name = name
        cfg.model.revision = str(rev)
        cfg.model.revision_resolved = d.name
    return cfg
