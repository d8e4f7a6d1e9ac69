"""Stage `handoff`: the SFT output of `init` becomes the RL initial actor -- checked first.

    python -m eksft_pipeline stage=handoff init=eksft     # the EKSFT SFT output of this run dir
    python -m eksft_pipeline stage=handoff init=base      # the model before SFT
    python -m eksft_pipeline stage=handoff init=/ckpt/global_step_400   # a path (HF dir or FSDP shards)

Resolution: `init=<method>` -> `<run_dir>/sft/<method>/hf_model` (from the manifest); `base` ->
`model.path`; anything else -> a local directory or an HF hub name. A verl checkpoint directory with
only FSDP shards (`model_world_size_*_rank_*.pt`) is merged with `python -m verl.model_merger merge
--backend fsdp` into `<run_dir>/handoff/<init>/merged/`. verl 0.9.1's merger casts every tensor to bf16
(verl/model_merger/fsdp_model_merger.py, `_load_and_merge_state_dicts`), which would start RL from a rounded
copy of an fp32 SFT result; for shards on a 1-D mesh (FSDP/FSDP2 data parallel, what the SFT stage writes) the
tensors are then re-gathered in their saved precision, checked to round to exactly verl's bf16 result (verl
stays the reference for the layout), and written over it. Other layouts keep verl's bf16 output; the report
says which (`merge.precision`).

Checks (each a clear error, because these mismatches are the most common silent failure of SFT->RL
pipelines: the run "works" and the reward stays at zero):
  weights      the weights load (fully for small models; tensor names vs the architecture otherwise)
  template     the init tokenizer, with the run's chat template set as the RL stage sets it
               (`actor_rollout_ref.model.custom_chat_template`), renders the RL prompts exactly as the
               run's SFT tokenizer (`<run_dir>/split/tokenizer`) rendered the SFT prompts, and an SFT
               conversation's rendering starts with its rendered prompt + the split's generation prefix
               (what RL will generate after); the report says whether the init model's saved template is
               the run's (`init_template_is_run_template`; RL and eval render with the run's template either way)
  eos          the token that ends every assistant turn in the SFT data is the model's EOS, i.e. the
               rollout's stop token (tokenizer eos and generation_config eos_token_id)
  context      rl.max_prompt_length + rl.max_response_length fits max_position_embeddings, and the
               longest RL prompt fits rl.max_prompt_length

Output: `handoff_report.json` with every check and `model` = the directory the RL stage starts from.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from eksft_pipeline.contract.keys import check_init_spec, handoff_key, init_model
from eksft_pipeline.contract.stage_api import Stage, StageContext, StageResult, positive


class HandoffError(ValueError):
    """The model cannot start RL as configured; the message says which check failed and why."""


def _is_fsdp_checkpoint(d: Path) -> bool:
    return any(d.glob("model_world_size_*_rank_*.pt"))


def gather_fsdp_shards(ckpt_dir: Path) -> dict[str, Any] | None:
    """Full tensors, in their saved dtype, from FSDP shards on a 1-D device mesh; None for any other layout.

    DTensor entries: the ranks' local tensors concatenated along the Shard dim in rank order (uneven last
    shard allowed), or rank 0's copy for Replicate. Plain tensors (buffers, world size 1): rank 0's copy.
    """
    import re

    import torch
    from torch.distributed.tensor import DTensor

    names = [re.fullmatch(r"model_world_size_(\d+)_rank_\d+\.pt", f.name) for f in ckpt_dir.iterdir()]
    world = {int(m.group(1)) for m in names if m}
    if len(world) != 1:
        return None
    ws = world.pop()
    paths = [ckpt_dir / f"model_world_size_{ws}_rank_{r}.pt" for r in range(ws)]
    if not all(p.is_file() for p in paths):
        raise HandoffError(f"weights: {ckpt_dir} lacks some of the {ws} shards model_world_size_{ws}_rank_*.pt")
    shards = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
    out: dict[str, Any] = {}
    for key, t0 in shards[0].items():
        if not isinstance(t0, DTensor):
            out[key] = t0
            continue
        if t0.device_mesh.ndim != 1 or len(t0.placements) != 1:
            return None
        place = t0.placements[0]
        if place.is_shard():
            out[key] = torch.cat([s[key]._local_tensor for s in shards], dim=place.dim)
        elif place.is_replicate():
            out[key] = t0._local_tensor
        else:
            return None
        if tuple(out[key].shape) != tuple(t0.shape):
            raise HandoffError(f"weights: {key} re-gathers to {tuple(out[key].shape)}, expected {tuple(t0.shape)}")
    return out


def _restore_precision(ckpt_dir: Path, target: Path) -> dict[str, Any]:
    """Replace verl's bf16 merge in `target` by the shards' own precision where that is provably the same model."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    weight_files = sorted(target.glob("*.safetensors"))
    if not weight_files:
        return {"precision": "bfloat16", "reason": "verl.model_merger wrote no *.safetensors; its output kept"}
    full = gather_fsdp_shards(ckpt_dir)  # every shard in memory: only once there is something to compare with
    if full is None:
        return {"precision": "bfloat16", "reason": "layout not a 1-D FSDP mesh: verl.model_merger's bf16 output kept"}
    merged: dict[str, torch.Tensor] = {}
    for f in weight_files:
        merged.update(load_file(str(f)))
    missing = sorted(set(merged) - set(full))
    if missing:
        return {"precision": "bfloat16", "reason": f"verl's merge has tensors the shards lack, e.g. {missing[:3]}"}
    for key, ref in merged.items():
        if full[key].shape != ref.shape or not torch.equal(full[key].to(ref.dtype), ref):
            raise HandoffError(f"weights: FSDP re-gather of {key} disagrees with verl.model_merger's result")
    dtypes = sorted({str(full[k].dtype).removeprefix("torch.") for k in merged})
    if dtypes == ["bfloat16"]:
        return {"precision": "bfloat16", "reason": "the shards are bf16"}
    for f in weight_files + sorted(target.glob("*.safetensors.index.json")):
        f.unlink()
    save_torch_state_dict({k: full[k].contiguous() for k in merged}, target)
    return {"precision": "+".join(dtypes), "reason": "re-gathered from the shards; rounds to verl's bf16 merge exactly"}


def merge_fsdp_checkpoint(ckpt_dir: Path, target: Path, env: dict | None = None) -> tuple[Path, dict[str, Any]]:
    """verl's own merger: FSDP shards (+ huggingface/ config) -> an HF model directory, in the shards' precision.

    Returns (directory, {"tool", "precision", "reason"}).
    """
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
           "--local_dir", str(ckpt_dir), "--target_dir", str(target)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        from eksft_pipeline.contract.artifacts import first_exception

        hit = first_exception(res.stderr)
        cause = hit["exception"] if hit else (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise HandoffError(f"verl.model_merger failed on {ckpt_dir} (exit {res.returncode}): {cause}")
    hf_src = ckpt_dir / "huggingface"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (hf_src / name).exists() and not (target / name).exists():
            (target / name).write_bytes((hf_src / name).read_bytes())
    return target, {"tool": "verl.model_merger", **_restore_precision(ckpt_dir, target)}


def check_weights(model_dir: Path, *, full_load_limit_bytes: int = 2 << 30) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise HandoffError(f"weights: no *.safetensors / pytorch_model*.bin in {model_dir}")
    size = sum(f.stat().st_size for f in files)
    config = AutoConfig.from_pretrained(str(model_dir))
    if size <= full_load_limit_bytes:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            raise HandoffError(f"weights: {model_dir} does not load: {type(e).__name__}: {e}") from e
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise HandoffError(f"weights: non-finite values in {bad[:5]}")
        n_params = sum(p.numel() for p in model.parameters())
        return {"ok": True, "mode": "full_load", "n_params": int(n_params), "bytes": size}
    # large model: compare tensor names in the files with the architecture (meta device, no memory)
    from safetensors import safe_open

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = set(model.state_dict())
    found = set()
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                found |= set(sf.keys())
    missing = sorted(k for k in expected - found if not (k.endswith("lm_head.weight") and config.tie_word_embeddings))
    if missing:
        raise HandoffError(f"weights: {len(missing)} tensors of the architecture are absent, e.g. {missing[:5]}")
    return {"ok": True, "mode": "tensor_names", "bytes": size, "n_tensors": len(found)}


def _render(tok, messages, *, gen: bool) -> str:
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)


def check_template(init_tok, sft_tok, sft_rows: list[list[dict]], rl_prompts: list[list[dict]], generation_prefix: str) -> dict:
    """RL prompts render identically with the init and the SFT tokenizer, and SFT conversations begin
    with their rendered prompt + generation prefix."""
    if not getattr(init_tok, "chat_template", None):
        raise HandoffError("template: the init model's tokenizer has no chat template")
    for i, msgs in enumerate(rl_prompts):
        a, b = _render(init_tok, msgs, gen=True), _render(sft_tok, msgs, gen=True)
        if a != b:
            raise HandoffError(
                "template: the init model renders RL prompts differently from the tokenizer SFT was trained "
                f"with (RL row {i}).\n  init: {a[-300:]!r}\n  sft:  {b[-300:]!r}"
            )
    for i, conv in enumerate(sft_rows):
        prompt = [m for m in conv if m["role"] != "assistant"]
        full = _render(sft_tok, conv, gen=False)
        head = _render(sft_tok, prompt, gen=True) + generation_prefix
        if not full.startswith(head):
            raise HandoffError(
                "template: an SFT conversation does not start with its rendered prompt + generation prefix "
                f"{generation_prefix!r} (SFT row {i}); RL would generate from a different context than SFT trained "
                f"on.\n  prompt+prefix: {head[-200:]!r}\n  conversation:  {full[: len(head) + 40][-240:]!r}"
            )
    return {"ok": True, "n_rl_checked": len(rl_prompts), "n_sft_checked": len(sft_rows),
            "generation_prefix": generation_prefix}


def sft_end_token(sft_tok, conv: list[dict]) -> int:
    """The token that follows the assistant content in the SFT rendering (what SFT taught to emit last)."""
    full = _render(sft_tok, conv, gen=False)
    content = conv[-1]["content"]
    pos = full.rfind(content)
    if pos < 0:
        raise HandoffError("eos: the assistant content is not verbatim in its own rendering; cannot find the end token")
    tail = full[pos + len(content):]
    ids = sft_tok(tail, add_special_tokens=False)["input_ids"]
    if not ids:
        raise HandoffError("eos: the chat template puts nothing after the assistant turn (no end-of-turn token)")
    return int(ids[0])


def check_eos(init_tok, init_dir: Path, sft_tok, sft_rows: list[list[dict]]) -> dict:
    from transformers import GenerationConfig

    ends = {sft_end_token(sft_tok, conv) for conv in sft_rows}
    if len(ends) != 1:
        raise HandoffError(f"eos: SFT conversations end with different tokens {sorted(ends)}")
    end = ends.pop()
    stop_ids = set()
    try:
        gc = GenerationConfig.from_pretrained(str(init_dir))
        e = gc.eos_token_id
        stop_ids |= set(e if isinstance(e, list) else [e] if e is not None else [])
    except OSError:
        gc = None
    if init_tok.eos_token_id is not None:
        stop_ids.add(int(init_tok.eos_token_id))
    if end not in stop_ids:
        raise HandoffError(
            f"eos: SFT taught the model to end turns with token {end} ({sft_tok.convert_ids_to_tokens(end)!r}), "
            f"but the rollout stops on {sorted(stop_ids)} ({init_tok.convert_ids_to_tokens(sorted(stop_ids))}); "
            "set the tokenizer's eos_token / generation_config.eos_token_id of the init model"
        )
    return {"ok": True, "end_token_id": end, "end_token": sft_tok.convert_ids_to_tokens(end),
            "stop_token_ids": sorted(stop_ids), "generation_config": gc is not None}


def check_context(init_dir: Path, tok, rl_prompts: list[list[dict]], generation_prefix: str,
                  max_prompt: int, max_response: int) -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(init_dir))
    ctx_len = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if ctx_len and max_prompt + max_response > ctx_len:
        raise HandoffError(
            f"context: rl.max_prompt_length {max_prompt} + rl.max_response_length {max_response} = "
            f"{max_prompt + max_response} exceeds the model's max_position_embeddings {ctx_len}"
        )
    lens = [len(tok(_render(tok, m, gen=True) + generation_prefix, add_special_tokens=False)["input_ids"])
            for m in rl_prompts]
    longest = max(lens) if lens else 0
    n_over = sum(n > max_prompt for n in lens)
    if n_over:
        raise HandoffError(f"context: {n_over} of {len(lens)} checked RL prompts exceed rl.max_prompt_length "
                           f"{max_prompt} (longest {longest} tokens)")
    return {"ok": True, "max_position_embeddings": ctx_len, "max_prompt_length": max_prompt,
            "max_response_length": max_response, "longest_prompt_checked": longest}


class HandoffStage(Stage):
    name = "handoff"

    def key(self, cfg):
        return handoff_key(cfg)

    def config(self, cfg):
        return {"init": cfg.get("init"), "method": str(cfg.method.name), "model": str(cfg.model.path),
                "chat_template": cfg.model.get("chat_template"), "eos_token": cfg.model.get("eos_token"),
                "rl_lengths": [int(cfg.rl.max_prompt_length), int(cfg.rl.max_response_length)],
                "handoff": dict(cfg.handoff)}

    def source(self, ctx: StageContext) -> str:
        """The model RL will start from: what `init=` names (contract/keys.py `init_model`)."""
        return init_model(ctx)

    def inputs(self, ctx):
        inp = {}
        src = self.source(ctx)
        if Path(src).exists():
            inp["init_model"] = src
        if not ctx.dry_run:
            split = ctx.upstream("split")
            inp.update(sft_train=split["sft_train"], rl_train=split["rl_train"], split_report=split["report"])
            if split.get("tokenizer"):
                inp["run_tokenizer"] = split["tokenizer"]
        return inp

    def check(self, ctx):
        check_init_spec(ctx.init_spec())
        positive(ctx.cfg.handoff, "n_check", "handoff")
        positive(ctx.cfg.rl, "max_prompt_length", "rl")
        positive(ctx.cfg.rl, "max_response_length", "rl")

    def describe(self, ctx):
        return {"stage": "handoff", "key": ctx.key, "init": ctx.init_spec(), "model": self.source(ctx),
                "checks": ["weights", "template", "eos", "context"]}

    def run(self, ctx: StageContext) -> StageResult:
        from transformers import AutoTokenizer

        cfg = ctx.cfg
        out = ctx.out_dir
        fmt = ctx.run_format  # template, EOS, generation prefix and the base model's directory, as the split recorded
        src = self.source(ctx)
        model_dir = fmt.model_dir_of(src)
        merge_info = None
        if not (list(model_dir.glob("*.safetensors")) or list(model_dir.glob("pytorch_model*.bin"))) and _is_fsdp_checkpoint(model_dir):
            model_dir, merge_info = merge_fsdp_checkpoint(model_dir, out / "merged", env=ctx.env())
        split = ctx.upstream("split")
        prefix = fmt.generation_prefix
        n_check = int(cfg.handoff.get("n_check", 64))
        sft_df = pd.read_parquet(split["sft_train"])
        rl_df = pd.read_parquet(split["rl_train"])
        sft_rows = [[dict(m) for m in msgs] for msgs in sft_df["messages"].head(n_check)]
        rl_prompts = [[dict(m) for m in p] for p in rl_df["prompt"].head(n_check)]

        from eksft_pipeline.data.chat_template import apply_template

        template = fmt.chat_template
        init_tok = AutoTokenizer.from_pretrained(str(model_dir))
        init_saved_template = getattr(init_tok, "chat_template", None)
        if template is not None:
            init_tok.chat_template = template  # what verl's RL dataset and agent loop render with
        # the tokenizer SFT rendered its data with: the split's run tokenizer (template + EOS), which the SFT
        # stage hands to verl as model.tokenizer_path; runs split before it existed: the base model's + template
        if fmt.tokenizer_dir and Path(fmt.tokenizer_dir).is_dir():
            sft_tok = AutoTokenizer.from_pretrained(fmt.tokenizer_dir)
        else:
            sft_tok = apply_template(AutoTokenizer.from_pretrained(str(fmt.base_model_dir())), template, fmt.eos_token)

        report: dict[str, Any] = {"init": ctx.init_spec(), "source": src, "model": str(model_dir), "merged_fsdp": merge_info is not None,
                                  "merge": merge_info, "chat_template": fmt.chat_template_spec,
                                  "init_template_is_run_template": template is None or init_saved_template == template}
        if not report["init_template_is_run_template"]:
            print(f"[handoff] note: {model_dir} saved a chat template other than the run's "
                  f"({fmt.chat_template_spec}); RL and eval render with the run's", flush=True)
        checks = [
            ("weights", lambda: check_weights(model_dir)),
            ("template", lambda: check_template(init_tok, sft_tok, sft_rows, rl_prompts, prefix)),
            ("eos", lambda: check_eos(init_tok, model_dir, sft_tok, sft_rows)),
            ("context", lambda: check_context(model_dir, init_tok, rl_prompts, prefix,
                                              int(cfg.rl.max_prompt_length), int(cfg.rl.max_response_length))),
        ]
        failures = []
        for name, fn in checks:
            try:
                report[name] = fn()
            except HandoffError as e:
                report[name] = {"ok": False, "error": str(e)}
                failures.append(str(e))
        from eksft_pipeline.contract.artifacts import atomic_write_json

        atomic_write_json(out / "handoff_report.json", report, indent=2, default=str)
        if failures and bool(cfg.handoff.strict):
            raise HandoffError("handoff checks failed (handoff.strict=true):\n- " + "\n- ".join(failures))
        return StageResult(outputs={"model": str(model_dir), "report": str(out / "handoff_report.json")},
                           summary={name: report[name].get("ok") for name, _ in checks})
