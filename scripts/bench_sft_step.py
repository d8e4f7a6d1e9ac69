"""One SFT training step inside verl's SFT trainer at Qwen3's vocabulary: peak memory and step time.

    python scripts/bench_sft_step.py                          # CPU (or the GPU if present): V=151,936, d=128, 2 layers
    python scripts/bench_sft_step.py --preset qwen3-8b-trunc  # GPU: Qwen3-8B shapes (d=4096, 32/8 heads,
                                                              # 12288 MLP, untied head), 2 layers, bf16
    python scripts/bench_sft_step.py --vocab 4096 --steps 2 --warmup 1  # quick smoke (numbers meaningless)

Variants, each in its own process (`torchrun --nproc_per_node=1`: fresh allocator, its own peak; the verl side of
that process is eksft_pipeline/verl_ext/sft_bench.py, this script imports no verl):
    verl-sft-fused  verl 0.9.1's own `SFTTrainer` (plain SFT, `sft_loss`) with `model.use_fused_kernels=true`
                    (chunked fused linear head, no [N, V] logits): the floor
    eksft-naive     `EKSFTTrainer`, EKSFT (paper defaults), `eksft.head=naive`: verl's full [N, V] logits for the
                    policy, reference logits rebuilt from the reference's hidden states (the naive loss head)
    eksft-fused     `EKSFTTrainer`, EKSFT, `eksft.head=fused`: hidden states + lm_head weight (losses/fused.py)
                    for policy and reference, no [N, V] tensor; the reference forward runs once per step

Model: a Qwen3 of the real vocabulary (151,936), small hidden size and depth, random init, untied lm_head
(as Qwen3-4B/8B: FSDP2 then wraps lm_head as its own unit). Data: generated conversations of `--seq-tokens`
tokens (the tiny tokenizer: only the first ids occur, which changes no cost); `--micro-tokens` is verl's
`max_token_len_per_gpu` (dynamic batching), and every step is one full micro-batch of that many tokens.
Steady state: the first `--warmup` steps are run but not timed (default 3 on a GPU, where verl's triton kernels
autotune and the fused head compiles for 6-14 s a step; 1 on CPU); `--steps` steps are timed after them. Per variant
the script prints the median and p90 step time, tokens/s, and MFU on a GPU (model FLOPs, see `model_flops_per_token`,
over `--peak-tflops`; the default is the device's dense bf16 datasheet rate). EKSFT's extra forwards (selection
pre-pass, reference) are work beyond the model FLOPs, so they show as a lower MFU at the same step time.
Peak memory is the training steps' own: the allocator's peak is reset after the model, optimizer and reference are
initialised, just before the first step (GPU: torch.cuda.reset_peak_memory_stats(), then max_memory_allocated();
CPU: /proc/self/clear_refs resets the peak resident set, then VmHWM), and read after the last timed step, before
verl's end-of-training checkpoint (the child stops there). The initialisation peak is printed beside it.
Machine load matters on CPU: run when idle.
The last line is exactly `eksft-fused vs verl-sft-fused: peak memory R1x, step time R2x` (steady-state medians).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("verl-sft-fused", "eksft-naive", "eksft-fused")
PRESETS = {
    # CPU default: the vocabulary is real, the trunk is tiny, so the LM head dominates as it does at 20k tokens
    "cpu-small": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384, head_dim=32, dtype="float32",
                      seq_tokens=1024, micro_tokens=4096, verl_backend="torch"),
    # a Qwen3-8B truncated to 2 layers: hidden 4096, 32 query / 8 kv heads of 128, SwiGLU 12288, untied head
    "qwen3-8b-trunc": dict(hidden=4096, layers=2, heads=32, kv_heads=8, intermediate=12288, head_dim=128,
                           dtype="bfloat16", seq_tokens=4096, micro_tokens=8192, verl_backend="triton"),
}


# ------------------------------------------------------------------------------------------- assets (parent)


def build_assets(work: Path, args) -> tuple[Path, Path, list[int]]:
    """Random-init Qwen3 of vocabulary args.vocab + tokenizer in work/model, conversations in work/data.parquet."""
    import pandas as pd
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from eksft_pipeline.data.tiny_assets import make_tiny_assets
    from eksft_pipeline.models.tiny import save_generation_config
    from eksft_pipeline.models.tokenizer import save_tokenizer

    model_dir, data_file = work / "model", work / "data.parquet"
    stamp = work / "assets.json"
    key = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "intermediate",
                                          "head_dim", "dtype", "seq_tokens", "micro_tokens", "steps", "warmup")}
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return model_dir, data_file, json.loads(stamp.read_text())["lengths"]
    tiny = make_tiny_assets(work / "tiny", n_problems=64, n_eval_per_source=2, n_pretrain=64, pretrain=False,
                            model_kwargs=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                              intermediate_size=64), progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    cfg = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(4096, 2 * args.seq_tokens), max_window_layers=args.layers,
        tie_word_embeddings=False, use_cache=False, rms_norm_eps=1e-6,
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, args.dtype))
    model.save_pretrained(str(model_dir))
    save_tokenizer(tok, model_dir)
    save_generation_config(model_dir, tok)
    del model

    def n_tokens(msgs) -> int:
        out = tok.apply_chat_template(msgs, tokenize=True)
        return len(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding

    # conversations of ~seq_tokens tokens: a short prompt, a long response of random digits and words
    rng = random.Random(0)
    words = ["the", "answer", "is", "so", "we", "get", "then", "sum", "=", "+", "x", "y", "\n"]
    n_seq = (args.warmup + args.steps + 1) * max(1, args.micro_tokens // args.seq_tokens)
    rows, lengths = [], []
    for _ in range(n_seq):
        prompt = "Solve: " + " ".join(str(rng.randint(0, 999)) for _ in range(12))
        text, resp = [], ""
        while True:
            text.append(rng.choice(words) if rng.random() < 0.5 else str(rng.randint(0, 99)))
            if len(text) % 32 == 0:
                resp = " ".join(text)
                msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]
                n = n_tokens(msgs)
                if n >= args.seq_tokens - 24:
                    break
        ids = tok(resp)["input_ids"]
        over = n - (args.seq_tokens - 8)  # a little slack: re-tokenising the cut text may add a token
        if over > 0:
            resp = tok.decode(ids[: len(ids) - over])
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]
        lengths.append(n_tokens(msgs))
        rows.append({"messages": msgs})
    pd.DataFrame(rows).to_parquet(data_file)
    stamp.write_text(json.dumps({"key": key, "lengths": lengths}))
    return model_dir, data_file, lengths


# -------------------------------------------------------------------------------------- steady-state numbers

# dense bf16 datasheet rates (TFLOP/s) by device-name substring; a measured ceiling can be given by --peak-tflops
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def model_flops_per_token(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                          vocab: int, seq_len: float) -> float:
    """Training FLOPs per token of a Qwen3 decoder (PaLM's MFU convention, causal attention).

    6 x (the matmul parameters: q/k/v/o projections, the SwiGLU MLP, the untied lm_head; not the input embedding,
    which is a gather) + 6 x layers x (heads x head_dim) x seq_len for QK^T and AV (12 L H Q T halved: causal).
    """
    attn_proj = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    matmul_params = layers * (attn_proj + mlp) + vocab * hidden
    return 6.0 * matmul_params + 6.0 * layers * heads * head_dim * seq_len


def steady_state(step_times: list[float], step_tokens: list[int], warmup: int, flops_per_token: float | None = None,
                 peak_flops: float | None = None) -> dict:
    """Median / p90 step time, tokens/s and MFU over the steps after the first `warmup`.

    p90 is the nearest-rank 90th percentile (the value at rank ceil(0.9 n)); tokens/s is the timed steps' tokens over
    their summed time; MFU = tokens/s x flops_per_token / peak_flops (None when either is unknown).
    """
    if len(step_times) != len(step_tokens):
        raise ValueError(f"{len(step_times)} step times but {len(step_tokens)} token counts")
    times, tokens = step_times[warmup:], step_tokens[warmup:]
    if not times:
        raise ValueError(f"no step after the {warmup} warm-up steps (ran {len(step_times)})")
    ranked = sorted(times)
    p90 = ranked[max(0, -(-9 * len(ranked) // 10) - 1)]
    tps = sum(tokens) / sum(times)
    mfu = tps * flops_per_token / peak_flops if flops_per_token and peak_flops else None
    return {"n": len(times), "median_s": statistics.median(times), "p90_s": p90, "tokens_per_s": tps, "mfu": mfu}


# ---------------------------------------------------------------------------------------------- child


def child_config(args, variant: str, model_dir: Path, data_file: Path, work: Path):
    from omegaconf import OmegaConf, open_dict

    from eksft_pipeline.verl_ext.verl_config import compose_verl

    vc = compose_verl("sft")
    n_seq_per_step = max(1, args.micro_tokens // args.seq_tokens)
    gpu = args.device == "cuda"
    with open_dict(vc):
        vc.model.path = str(model_dir)
        vc.model.use_remove_padding = True
        vc.model.enable_gradient_checkpointing = bool(args.grad_ckpt)
        vc.model.override_config = {"attn_implementation": args.attn}
        vc.data.train_files = str(data_file)
        vc.data.val_files = None
        vc.data.train_batch_size = n_seq_per_step
        vc.data.micro_batch_size_per_gpu = 1
        vc.data.use_dynamic_bsz = True
        vc.data.max_token_len_per_gpu = args.micro_tokens
        vc.data.max_length = args.seq_tokens + 64
        vc.data.truncation = "error"
        vc.data.num_workers = 0
        vc.engine.strategy = "fsdp2"
        vc.engine.use_torch_compile = False
        if args.dtype == "float32":
            vc.engine.mixed_precision = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
        vc.optim.lr = 1e-5
        vc.trainer.total_epochs = 1
        vc.trainer.total_training_steps = args.warmup + args.steps + 1
        vc.trainer.save_freq = -1
        vc.trainer.test_freq = -1
        vc.trainer.resume_mode = "disable"
        vc.trainer.logger = ["console"]
        vc.trainer.default_local_dir = str(work / "ckpt" / variant)
        vc.trainer.n_gpus_per_node = 1
        vc.trainer.nnodes = 1
        vc.trainer.device = "cuda" if gpu else "cpu"
        vc.eksft.loss = "eksft"
        vc.eksft.loss_params = {"rho": 0.2, "lambda_entropy": 0.05, "lambda_kl": 0.05}
        vc.eksft.ref_hidden_store = args.ref_store
        if variant == "verl-sft-fused":
            vc.model.use_fused_kernels = True
            vc.model.fused_kernel_options = {"impl_backend": args.verl_backend}
        else:
            vc.eksft.head = "fused" if variant == "eksft-fused" else "naive"
    return OmegaConf.create(OmegaConf.to_container(vc, resolve=True))


def run_child(args) -> None:
    """One variant in this (torchrun) process; verl itself is driven by eksft_pipeline/verl_ext/sft_bench.py."""
    import torch

    from eksft_pipeline.verl_ext.sft_bench import timed_sft_steps

    work = Path(args.work_dir)
    config = child_config(args, args.child, work / "model", work / "data.parquet", work)
    cuda = torch.cuda.is_available() and args.device == "cuda"
    res = timed_sft_steps(config, floor=args.child == "verl-sft-fused", steps=args.warmup + args.steps, cuda=cuda)
    res = {"variant": args.child, **res, "device": "cuda" if cuda else "cpu",
           "device_name": torch.cuda.get_device_name(0) if cuda else "cpu"}  # fmt: skip
    Path(args.result).write_text(json.dumps(res))


# --------------------------------------------------------------------------------------------- parent


def run_variant(args, variant: str, work: Path) -> dict:
    from eksft_pipeline.verl_ext.cpu_platform import cpu_env

    result = work / f"result-{variant}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.device == "cpu":
        env.update(cpu_env())
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env.setdefault("VERL_SFT_LOGGING_LEVEL", "WARN")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
           "--child", variant, "--result", str(result), *sys.argv[1:]]
    log = work / f"log-{variant}.txt"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0 or not result.is_file():
        lines = log.read_text(errors="replace").splitlines()
        reason = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "")
        return {"variant": variant, "failed": f"rc={rc}: {reason.strip()[:300]} (log {log})"}
    res = json.loads(result.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model/data sizes (default cpu-small)")
    ap.add_argument("--vocab", type=int, default=151936)
    for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "head_dim", "seq_tokens", "micro_tokens"):
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=int, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--verl-backend", dest="verl_backend", choices=["torch", "triton", "liger"], default=None,
                    help="verl's fused-kernel backend for the floor (CPU: torch)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant after the warm-up "
                    "(default 10 on a GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3 on a GPU: autotuning "
                    "and compilation; 1 on CPU)")
    ap.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for MFU (default: dense bf16 datasheet rate by device name)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa | flash_attention_2)")
    ap.add_argument("--ref-store", dest="ref_store", choices=["device", "host"], default="device")
    ap.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", help="gradient checkpointing (GPU preset)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--work-dir", dest="work_dir", default=None)
    ap.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.steps = args.steps if args.steps is not None else (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    preset = PRESETS[args.preset or "cpu-small"]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.micro_tokens < args.seq_tokens:
        raise SystemExit(f"--micro-tokens {args.micro_tokens} must be >= --seq-tokens {args.seq_tokens}")
    args.work_dir = args.work_dir or str(Path(os.environ.get("TMPDIR", "/tmp")) / f"eksft-bench-sft-{args.preset or 'cpu-small'}")
    if args.child:
        run_child(args)
        return
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    _, _, lengths = build_assets(work, args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model: Qwen3 V={args.vocab} d={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
          f"mlp={args.intermediate} {args.dtype}, untied lm_head, random init; device={args.device}")
    print(f"data: {len(lengths)} conversations of {min(lengths)}-{max(lengths)} tokens; micro-batch budget "
          f"{args.micro_tokens} tokens (max_token_len_per_gpu), {max(1, args.micro_tokens // args.seq_tokens)} "
          f"sequences per step; {args.warmup} warm-up + {args.steps} timed steps per variant; load average at "
          f"start {load:.2f}")
    results = {}
    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
        r = run_variant(args, variant, work)
        if "failed" in r:
            print(f"  {variant:15s} FAILED {r['failed']}", flush=True)
            continue
        results[variant] = r
        seq_len = statistics.mean(lengths)
        fpt = model_flops_per_token(args.hidden, args.layers, args.heads, args.kv_heads, args.head_dim,
                                    args.intermediate, args.vocab, seq_len)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in r["device_name"]), None)
        st = steady_state(r["step_times"], r["tokens_per_step"], args.warmup, fpt, peak * 1e12 if peak else None)
        r["step_s"] = st["median_s"]
        ref = [x for x in r["ref_forwards_per_step"] if x is not None]
        mem = "max_memory_allocated" if r["device"] == "cuda" else "peak RSS"
        print(f"  {variant:15s} {mem} {r['peak_bytes'] / 2**30:7.3f} GiB over the steps (init "
              f"{r['init_peak_bytes'] / 2**30:.3f} GiB)   step median {st['median_s']:.3f} s, p90 {st['p90_s']:.3f} s "
              f"over steps {args.warmup + 1}-{args.warmup + st['n']}   {st['tokens_per_s']:,.0f} tokens/s   MFU "
              + (f"{st['mfu']:.1%} of {peak:.0f} TFLOP/s" if st["mfu"] is not None else "n/a")
              + (f"   ref forwards/step {ref[-1]:.2f}" if ref else "")
              + f"\n  {'':15s} all steps (s): {', '.join(f'{t:.2f}' for t in r['step_times'])}; tokens/step "
              f"{r['tokens_per_step'][-1]}", flush=True)
    if os.getloadavg:
        print(f"load average at end {os.getloadavg()[0]:.2f}")
    if "eksft-fused" in results and "verl-sft-fused" in results:
        a, b = results["eksft-fused"], results["verl-sft-fused"]
        if "eksft-naive" in results:
            n = results["eksft-naive"]
            print(f"eksft-naive vs verl-sft-fused: peak memory {n['peak_bytes'] / b['peak_bytes']:.2f}x, "
                  f"step time {n['step_s'] / b['step_s']:.2f}x")
        print(f"eksft-fused vs verl-sft-fused: peak memory {a['peak_bytes'] / b['peak_bytes']:.2f}x, "
              f"step time {a['step_s'] / b['step_s']:.2f}x")
    else:
        raise SystemExit("eksft-fused or verl-sft-fused did not run: no ratio")


if __name__ == "__main__":
    main()
