"""The CPU default's assets, built locally and idempotently: synthetic data, tokenizer, tiny model, pretraining.

Launch (through the orchestrator): ``python -m eksft_pipeline stage=assets`` / ``make tiny-assets``; directly:
``python -c "from eksft_pipeline.data.tiny_assets import make_tiny_assets; make_tiny_assets('data/generated/tiny')"``.
Steps: :func:`eksft_pipeline.data.synth.make_tiny_data` (problems, eval prompts, pretraining corpus) ->
:func:`eksft_pipeline.models.tokenizer.build_tiny_tokenizer` -> :func:`eksft_pipeline.models.tiny.build_tiny_model`
-> :func:`eksft_pipeline.models.pretrain.pretrain_tiny`, then a completion marker with every file's sha256.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from pathlib import Path
from typing import Any

from eksft_pipeline.contract.manifest import sha256_file
from eksft_pipeline.data.synth import make_tiny_data
from eksft_pipeline.models.pretrain import pretrain_tiny
from eksft_pipeline.models.tiny import build_tiny_model, count_parameters
from eksft_pipeline.models.tokenizer import build_tiny_tokenizer, render_chatml

MARKER_FILE = "TINY_ASSETS_COMPLETE.json"


def _manifest_ok(out: Path, params: dict[str, Any]) -> bool:
    marker = out / MARKER_FILE
    if not marker.exists():
        return False
    try:
        m = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if m.get("params") != params:
        return False
    for rel, digest in m.get("sha256", {}).items():
        p = out / rel
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return bool(m.get("sha256"))


def make_tiny_assets(
    out_dir: str | Path,
    *,
    n_problems: int = 2400,
    n_eval_per_source: int = 32,
    n_pretrain: int = 4000,
    pretrain_chat_frac: float = 0.5,
    pretrain_chat_trace_frac: float = 0.2,
    sft_preamble: str | None = "default",
    pretrain_preamble_frac: float = 0.0,
    seed: int = 0,
    vocab_size: int = 1024,
    pretrain: bool = True,
    pretrain_steps: int = 800,
    pretrain_time_budget_s: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Build the whole CPU default in ``out_dir``: data, tokenizer, model, pretraining. Idempotent.

    Layout::

        out_dir/data/tiny_math_train.parquet   n_problems rows, OpenR1 schema (split-stage input)
        out_dir/data/tiny_math_eval.parquet    eval prompts, verl RL layout (the mix's families; default tiny_add, tiny_sub)
        out_dir/data/tiny_pretrain.jsonl       plain-text pretraining corpus, disjoint from both
        out_dir/model/                         Qwen3 model + tokenizer + generation_config (+ pretrain_log.json)
        out_dir/TINY_ASSETS_COMPLETE.json      completion marker: parameters + sha256 of every file above

    If the marker exists, its parameters equal this call's and every hash matches, nothing is rebuilt.
    Otherwise (absent, half-written, edited, other parameters, or ``force``) ``data/`` and ``model/`` are
    deleted and rebuilt; the marker is written last. The tokenizer is trained on the train problems and
    traces plus the system prompt. Returns ``{"root", "data_dir", "train", "eval", "pretrain_corpus",
    "model", "tokenizer", "marker"}`` (the tokenizer lives in the model dir).
    """
    out = Path(out_dir)
    params = {
        "n_problems": n_problems,
        "n_eval_per_source": n_eval_per_source,
        "n_pretrain": n_pretrain,
        "pretrain_chat_frac": pretrain_chat_frac,
        "pretrain_chat_trace_frac": pretrain_chat_trace_frac,
        "sft_preamble": sft_preamble,
        **({"pretrain_preamble_frac": pretrain_preamble_frac} if pretrain_preamble_frac else {}),
        "seed": seed,
        "vocab_size": vocab_size,
        "pretrain": pretrain,
        "pretrain_steps": pretrain_steps,
        "model_kwargs": dict(model_kwargs or {}),
    }
    data_dir, model_dir = out / "data", out / "model"
    paths = {
        "root": out,
        "data_dir": data_dir,
        "train": data_dir / "tiny_math_train.parquet",
        "eval": data_dir / "tiny_math_eval.parquet",
        "pretrain_corpus": data_dir / "tiny_pretrain.jsonl",
        "model": model_dir,
        "tokenizer": model_dir,
        "marker": out / MARKER_FILE,
    }
    if not force and _manifest_ok(out, params):
        if progress:
            print(f"[tiny] assets complete in {out} (marker + hashes match); skipping")
        return paths

    # one builder per folder: two runs started together on a fresh machine (or two test workers) would otherwise
    # delete and rewrite each other's files; the second waits for the first, then finds its marker
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = open(str(out) + ".lock", "a")  # closed, and so unlocked, in the finally below
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if progress:
            print(f"[tiny] another process is building {out} (lock {lock.name}); waiting for it", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        if not force and _manifest_ok(out, params):
            if progress:
                print(f"[tiny] assets complete in {out} (built by the process this one waited for); skipping")
            return paths
        t0 = time.perf_counter()
        (out / MARKER_FILE).unlink(missing_ok=True)
        for d in (data_dir, model_dir):
            if d.exists():
                shutil.rmtree(d)
        out.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"[tiny] building assets in {out} ...")
        made = make_tiny_data(
            data_dir, n_problems=n_problems, n_eval_per_source=n_eval_per_source, n_pretrain=n_pretrain, seed=seed,
            pretrain_chat_frac=pretrain_chat_frac, pretrain_chat_trace_frac=pretrain_chat_trace_frac,
            pretrain_preamble_frac=pretrain_preamble_frac,
            **({} if sft_preamble == "default" else {"sft_preamble": sft_preamble}),
        )
        tokenizer, pretrain_texts = _tiny_tokenizer(made, vocab_size)
        if progress:
            print(f"[tiny] tokenizer: {len(tokenizer)} tokens")
        model = build_tiny_model(model_dir, tokenizer, seed=seed, **(model_kwargs or {}))
        if progress:
            print(f"[tiny] model: {count_parameters(model):,} parameters")
        del model
        if pretrain:
            pretrain_tiny(
                model_dir,
                pretrain_texts,
                steps=pretrain_steps,
                seed=seed,
                time_budget_s=pretrain_time_budget_s,
                # one thread: the same weights on every machine (thread count changes float reductions), and a
                # 128-wide model gains little from a second thread while a busy 2-core box makes two threads crawl
                num_threads=1,
                progress=progress,
            )
        marker = _write_marker(out, params, (data_dir, model_dir), t0)
        if progress:
            print(f"[tiny] assets built in {marker['build_s']}s -> {out}")
    finally:
        lock.close()
    return paths


def _tiny_tokenizer(made: dict[str, Path], vocab_size: int):
    """(the tiny tokenizer, the pretraining texts). Tokenizer corpus: train conversations rendered with the chat
    template (so role names and the turn skeleton are learned) + the plain-text pretraining corpus."""
    import pyarrow.parquet as pq

    train_rows = pq.read_table(made["train"]).to_pylist()
    pretrain_texts = [json.loads(line)["text"] for line in made["pretrain"].read_text(encoding="utf-8").splitlines()]
    corpus = [render_chatml(r["prompt"] + r["target"]) for r in train_rows] + pretrain_texts
    return build_tiny_tokenizer(None, corpus, vocab_size=vocab_size), pretrain_texts


def _write_marker(out: Path, params: dict, dirs: tuple[Path, ...], t0: float) -> dict:
    """The completion marker, written last: the parameters and the sha256 of every file under `dirs` (only what
    make_tiny_assets owns: other stages may write next to data/ and model/ in out_dir)."""
    files = sorted(p for d in dirs for p in d.rglob("*") if p.is_file())
    marker = {
        "params": params,
        "sha256": {str(p.relative_to(out)): sha256_file(p) for p in files},
        "build_s": round(time.perf_counter() - t0, 2),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")
    return marker
