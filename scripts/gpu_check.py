"""What can be checked on ONE GPU with only torch, transformers and triton (no network, ray, vllm or verl).

    bash scripts/gpu_check.sh                  # one GPU: ~3 minutes on an H200 (2026-11-28); prints one summary at the end
    bash scripts/gpu_check.sh --cpu --tiny     # CPU smoke run of the same code paths at toy sizes (a test runs it)
    python scripts/gpu_check.py --probe head --n 256,512 --vocab 151936 --hidden 64 --head naive --cpu  # a probe

Checks (each in its own subprocess, so every memory peak is measured on a fresh allocator):
  env       torch / transformers / triton versions, the device
  losses    `pytest tests/losses` (on a GPU this includes tests/losses/test_fused_gpu.py: fused == naive on CUDA)
  head      the naive vs the fused EKSFT head at V = 151,936 (forward + backward): time, peak memory, and the peak
            against `eksft_pipeline.verl_ext.memory.loss_head_peak` (the dry run's head term)
  sft_step  one EKSFT step of a truncated Qwen3-8B-shaped model (the real hidden size, MLP width, heads and
            vocabulary, `--layers` decoder layers, random init) at the qwen3-8b recipe's token budget
            (`data.max_token_len_per_gpu`): selection pre-pass (policy + reference forward, global top-k),
            training pass with the reference forward and the EKSFT loss, backward, AdamW step; fp32 master weights,
            bf16 autocast, gradient checkpointing, sdpa attention -- once with the naive head (today's trainer)
            and once with the fused head. Its peak is compared with `sft_estimate` for the same shape (world 1),
            plus the reference weights this check keeps on the GPU (verl keeps them in pinned host memory) and
            minus the estimate's runtime and allocator-slack terms (not in max_memory_allocated; one fixed-size
            step does not fragment) and its FSDP-only terms (this probe is one process without FSDP).
            On CUDA it also prints the peak of each phase of the step.
Peak memory: CUDA `max_memory_allocated` above the inputs; CPU the process's peak resident set (VmHWM, reset via
/proc/self/clear_refs) above the resident set before the measured region.
A ratio measured / estimated within [0.85, 1.15] passes (not checked in the --tiny smoke run: at toy sizes the
interpreter and the malloc heap dominate). Record the printed summary in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the loss library and the memory model, without an install

TOLERANCE = 0.15
# sft_estimate terms that only FSDP has (matched by name); the single-process SFT probe leaves them out
FSDP_ONLY_TERMS = ("unsharded params", "lm_head grad in flight", "unsharded + fp32 reduce buffer")
QWEN3_8B = dict(hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936)
TINY = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=2048)


# --------------------------------------------------------------------------------------------- memory probes


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


class Peak:
    """Peak bytes allocated above the starting point: CUDA allocator stats, or the resident set on CPU."""

    def __init__(self, device: str, absolute: bool = False):
        self.device, self.absolute = device, absolute

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0 if self.absolute else torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident set
                f.write("5")
            self.base = 0 if self.absolute else _status_kib("VmRSS") * 1024
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.base
        self.seconds = time.perf_counter() - self.t0
        return False


def probe_heads(args) -> list[dict]:
    """probe_head for every N of ``--n a,b,c`` (one process: CPU probes fix glibc's mmap threshold, see _run_probe)."""
    out = []
    for n in [int(x) for x in str(args.n).split(",")]:
        one = argparse.Namespace(**{**vars(args), "n": n})
        out.append(probe_head(one))
    return out


def probe_head(args) -> dict:
    """One naive or fused EKSFT head, forward + backward, as the SFT training pass runs it."""
    import torch

    from eksft_pipeline.losses import get_loss
    from eksft_pipeline.losses.fused import fused_compute
    from eksft_pipeline.verl_ext.memory import loss_head_peak

    dev = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if dev == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    g = torch.Generator().manual_seed(0)
    n, v, d = args.n, args.vocab, args.hidden
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
    hidden = h.clone().to(dev, dtype).requires_grad_()
    weight = w.clone().to(dev, dtype).requires_grad_()
    ref_h = (h + 0.3 * torch.randn(n, d, generator=g)).to(dev, dtype)
    ref_w = (w + 0.02 * torch.randn(v, d, generator=g)).to(dev, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    loss = get_loss("eksft")
    with torch.no_grad():  # the selection pre-pass (chunked, not measured: the training pass is the peak)
        plan = loss.plan(loss.stats(hidden @ weight.T, ref_h @ ref_w.T, labels))
    frac = float(plan.token["mask"].float().mean())
    for _ in range(2 if dev == "cuda" else 1):  # CUDA: a warm-up round (kernels, compile) before the measured one
        hidden.grad = weight.grad = None
        with Peak(dev) as pk:
            if args.head == "naive":
                logits = hidden @ weight.T
                with torch.no_grad():
                    ref_logits = ref_h @ ref_w.T
                part, _ = loss.compute(logits, labels, ref_logits, plan.token, plan.scalars)
                del logits, ref_logits  # the trainer's hook returns; only the graph keeps what it saved
            else:
                part, _ = fused_compute(loss, hidden, weight, labels, ref_h, ref_w, plan.token, plan.scalars,
                                        chunk_size=args.chunk)  # fmt: skip
            part.backward()
    pred, terms = loss_head_peak(n, v, head=args.head, logits_bytes=4 if dtype == torch.float32 else 2, frac=frac,
                                 with_ref=True, hidden=d, chunk=args.chunk, device=dev, include_param_grads=True)  # fmt: skip
    return {"probe": "head", "head": args.head, "device": dev, "dtype": args.dtype, "n": n, "vocab": v, "hidden": d,
            "chunk": args.chunk, "selected_fraction": frac, "seconds": pk.seconds, "measured_bytes": pk.peak,
            "estimated_bytes": pred, "ratio": pk.peak / pred}  # fmt: skip


def _shape(args):
    from eksft_pipeline.verl_ext.memory import ModelShape

    s = TINY if args.tiny else QWEN3_8B
    return ModelShape(vocab=s["vocab"], hidden=s["hidden"], layers=args.layers, intermediate=s["intermediate"],
                      heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["head_dim"], tied=False)  # fmt: skip


def probe_sft(args) -> dict:
    """One EKSFT SFT step of a truncated Qwen3-8B-shaped model (see the module docstring)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from eksft_pipeline.losses import get_loss
    from eksft_pipeline.losses.fused import fused_compute, fused_stats
    from eksft_pipeline.verl_ext.memory import GIB, RUNTIME_BYTES, sft_estimate

    dev = "cpu" if args.cpu else "cuda"
    shape = _shape(args)
    if dev == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    compute = torch.float32 if dev == "cpu" else torch.bfloat16
    config = Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=max(40960, args.tokens), tie_word_embeddings=False,
        attn_implementation="sdpa", use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(dev):
        policy = Qwen3ForCausalLM(config).float()  # fp32 master weights (verl: engine.model_dtype=fp32)
        ref = Qwen3ForCausalLM(config).to(compute).eval().requires_grad_(False)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, foreach=False)
    n = args.tokens
    ids = torch.randint(0, shape.vocab, (1, n), device=dev)
    labels = torch.roll(ids[0], -1).clone()
    labels[: n // 5] = -100  # the prompt part of the packed sequence
    labels[-1] = -100
    loss = get_loss("eksft")
    ac = torch.autocast(dev, dtype=compute, enabled=compute != torch.float32)

    def hidden_of(model, grad: bool):
        with torch.set_grad_enabled(grad), ac:
            return model.model(input_ids=ids).last_hidden_state[0]  # [N, d]

    phases: dict[str, int] = {}

    def mark(name: str) -> None:
        """CUDA: the peak (bytes, everything allocated) since the previous mark; the step's peak is their max."""
        if dev == "cuda":
            torch.cuda.synchronize()
            phases[name] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        mark("before")
        with torch.no_grad():  # selection pre-pass: per-token H, KL over the batch -> global top-k plan
            hp, hr = hidden_of(policy, False), hidden_of(ref, False)
            if args.head == "naive":
                with ac:
                    stats = loss.stats(policy.lm_head(hp), ref.lm_head(hr), labels)
            else:
                stats = fused_stats(loss, hp.to(compute), policy.lm_head.weight.to(compute), hr, ref.lm_head.weight,
                                    labels)  # fmt: skip
            plan = loss.plan(stats)
            del hp
        mark("selection pre-pass")
        h = hidden_of(policy, True)
        if args.head == "naive":
            with ac:
                logits = policy.lm_head(h)  # [N, V] in the compute dtype
            with torch.no_grad(), ac:
                ref_logits = ref.lm_head(hidden_of(ref, False))  # the trainer's second reference forward
            part, _ = loss.compute(logits, labels, ref_logits, plan.token, plan.scalars)
            del logits, ref_logits
        else:  # the reference's hidden states are kept from the pre-pass: one reference forward per step
            part, _ = fused_compute(loss, h.to(compute), policy.lm_head.weight.to(compute), labels, hr,
                                    ref.lm_head.weight, plan.token, plan.scalars, chunk_size=args.chunk)  # fmt: skip
        del h
        mark("training forward + loss")
        part.backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer step")
        return float(plan.token["mask"].float().mean())

    step()  # creates AdamW's states; the measured step is the second
    with Peak(dev, absolute=True) as pk:  # everything allocated: weights, AdamW states, grads, activations
        frac = step()
    params = sum(p.numel() for p in policy.parameters())
    est = sft_estimate(shape, tokens=n, world=1, head=args.head, loss=loss, model_dtype="fp32",
                       compute_dtype="fp32" if compute == torch.float32 else "bf16", grad_ckpt=True,
                       chunk=args.chunk, device=dev)  # fmt: skip
    # the reference weights stay on the GPU here (verl keeps them in pinned host memory); the estimate's runtime
    # term (CUDA context, NCCL) is not in max_memory_allocated
    ref_bytes = params * (4 if compute == torch.float32 else 2)
    slack = sum(t.bytes for t in est.terms if t.name.startswith("allocator slack"))  # not in max_memory_allocated
    # FSDP's own buffers (gathered bf16 params, the lm_head grad before its reduce, one layer's unsharded grad and
    # fp32 reduce buffer) do not exist in this single-process step: those terms are left out of the comparison
    # and stay unchecked here (only a verl run on GPU sees them)
    fsdp = sum(t.bytes for t in est.terms if any(k in t.name for k in FSDP_ONLY_TERMS))
    estimated = est.total - RUNTIME_BYTES - slack - fsdp + ref_bytes
    peak = max(pk.peak, max(phases.values(), default=0))  # mark() resets CUDA's peak counter
    return {"probe": "sft_step", "head": args.head, "device": dev, "layers": shape.layers, "tokens": n,
            "params": params, "selected_fraction": frac, "seconds": pk.seconds, "measured_bytes": peak,
            "estimated_bytes": estimated, "ratio": peak / estimated, "fsdp_terms_left_out_bytes": fsdp, "estimate_gib": est.total / GIB,
            "estimate_text": "\n".join(est.lines()), "phase_peaks_gib": {k: round(v / 2**30, 2) for k, v in phases.items()}}  # fmt: skip


# --------------------------------------------------------------------------------------------- orchestration


def _run_probe(extra: list[str], timeout: float) -> dict:
    """A probe in its own process (fresh allocator); --tiny smoke runs stay in this one (startup dominates)."""
    if "--tiny" in extra:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            main(extra)
        return json.loads(buf.getvalue().strip().splitlines()[-1])
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           # a fixed mmap threshold: every tensor above 128 KiB is its own mapping, returned on free, so the peak
           # resident set of one measurement is not hidden by heap pages kept from an earlier one (glibc otherwise
           # raises the threshold up to 32 MiB after the first large free)
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"probe {' '.join(extra)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _recipe_tokens(model: str = "qwen3-8b") -> int:
    import yaml  # a transformers dependency

    r = yaml.safe_load((REPO / "recipes" / "model" / f"{model}.yaml").read_text())
    return int(r["sft"]["verl"]["data"]["max_token_len_per_gpu"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (no CUDA needed)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (smoke run of every code path)")
    ap.add_argument("--probe", choices=["head", "sft"], help="run one probe in this process and print JSON")
    ap.add_argument("--head", choices=["naive", "fused"], default="naive")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--n", default=None, help="head probe: rows (comma-separated: one measurement each)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None, help="fused head rows per chunk (default: the library's)")
    ap.add_argument("--layers", type=int, default=2, help="sft probe: decoder layers of the truncated model")
    ap.add_argument("--tokens", type=int, default=None, help="sft probe: tokens (default: the qwen3-8b recipe's)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest tests/losses")
    ap.add_argument("--verl", action="store_true", help="also run scripts/bench_sft_step.py (verl's SFT trainer: "
                    "verl-sft-fused vs EKSFT, steady state) when verl imports; ../shared/gpu-kit/ brings it to a bare "
                    "GPU machine")
    ap.add_argument("--verl-only", dest="verl_only", action="store_true", help="only the --verl benchmark")
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "fp32" if args.cpu else "bf16"

    if args.probe:
        if args.probe == "head":
            args.n = args.n or (256 if args.tiny else 8192)
            args.hidden = args.hidden or (64 if args.tiny else 4096)
            if args.tiny:
                args.vocab = TINY["vocab"] if args.vocab == 151936 else args.vocab
            res = probe_heads(args)
            res = res[0] if len(res) == 1 else res
        else:
            args.tokens = args.tokens or (256 if args.tiny else _recipe_tokens())
            res = probe_sft(args)
        print(json.dumps(res))
        return 0

    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    results: list[tuple[str, str, str]] = []  # (check, PASS/FAIL/SKIP, detail)

    import transformers

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "absent"
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    env_line = f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, triton {triton_v}, {dev_name}"
    results.append(("env", "PASS", env_line))
    print(f"[gpu_check] {env_line}", flush=True)

    if args.verl or args.verl_only:
        results.append(verl_bench(args))
        print(f"[gpu_check] {results[-1]}", flush=True)
    if args.verl_only:
        return _summary(results, args, t_start)

    # 1. the loss tests (on CUDA they include test_fused_gpu.py)
    if args.skip_tests:
        results.append(("losses", "SKIP", "--skip-tests"))
    else:
        try:
            import pytest  # noqa: F401

            sel = ["tests/losses/test_hand_computed.py"] if args.tiny else ["tests/losses"]
            t0 = time.perf_counter()
            # the package is not installed on a bare GPU image: tests and the scripts they start import it from here
            env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sel], cwd=REPO,
                               capture_output=True, text=True, timeout=420, env=env)  # fmt: skip
            last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
            results.append(("losses", "PASS" if r.returncode == 0 else "FAIL",
                            f"pytest {' '.join(sel)}: {last} ({time.perf_counter() - t0:.0f}s)"))
            if r.returncode:
                print(r.stdout[-4000:], flush=True)
        except ImportError:
            results.append(("losses", "SKIP", "pytest is not installed (pip install pytest hypothesis)"))
    print(f"[gpu_check] {results[-1]}", flush=True)

    # 2. naive vs fused head at Qwen3's vocabulary
    base = ["--cpu"] if args.cpu else []
    base += ["--tiny"] if args.tiny else []
    head_n = ["--n", "256", "--hidden", "64"] if args.tiny else ["--n", "8192", "--hidden", "4096"]
    heads = {}
    for head in ("naive", "fused"):
        extra = ["--probe", "head", "--head", head, "--dtype", args.dtype, *head_n]
        if head == "fused" and args.tiny:
            extra += ["--chunk", "64"]
        try:
            heads[head] = r = _run_probe(base + extra, timeout=300)
            ok = abs(r["ratio"] - 1) <= TOLERANCE or args.tiny  # toy sizes: a smoke run, the ratio is not checked
            results.append((f"head_{head}", "PASS" if ok else "FAIL",
                            f"N={r['n']} V={r['vocab']} d={r['hidden']} {r['dtype']}: {r['seconds']:.3f}s, peak "
                            f"{r['measured_bytes'] / 2**20:.0f} MiB vs estimate {r['estimated_bytes'] / 2**20:.0f} MiB "
                            f"(ratio {r['ratio']:.2f})"))  # fmt: skip
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            results.append((f"head_{head}", "FAIL", str(e)[-500:]))
        print(f"[gpu_check] {results[-1]}", flush=True)
    if len(heads) == 2:
        a, b = heads["fused"], heads["naive"]
        results.append(("head_fused_vs_naive", "PASS",
                        f"time {a['seconds'] / b['seconds']:.2f}x, peak memory {a['measured_bytes'] / b['measured_bytes']:.1%}"))

    # 3. the SFT step of a truncated Qwen3-8B-shaped model at the recipe's token budget
    tokens = ["--tokens", "256"] if args.tiny else ["--tokens", str(_recipe_tokens())]
    for head in ("naive", "fused"):
        extra = ["--probe", "sft", "--head", head, "--layers", "1" if args.tiny else str(args.layers), *tokens]
        if head == "fused" and args.tiny:
            extra += ["--chunk", "64"]
        try:
            r = _run_probe(base + extra, timeout=420)
            ok = abs(r["ratio"] - 1) <= TOLERANCE or args.tiny
            print(f"[gpu_check] sft_step_{head} peaks by phase (GiB): {r['phase_peaks_gib']}\n{r['estimate_text']}",
                  flush=True)
            results.append((f"sft_step_{head}", "PASS" if ok else "FAIL",
                            f"{r['layers']} layers, {r['params'] / 1e9:.2f}B params, {r['tokens']} tokens: "
                            f"{r['seconds']:.2f}s, peak {r['measured_bytes'] / 2**30:.2f} GiB vs estimate "
                            f"{r['estimated_bytes'] / 2**30:.2f} GiB (ratio {r['ratio']:.2f})"))  # fmt: skip
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            results.append((f"sft_step_{head}", "FAIL", str(e)[-500:]))
        print(f"[gpu_check] {results[-1]}", flush=True)

    return _summary(results, args, t_start)


def _summary(results: list[tuple[str, str, str]], args, t_start: float) -> int:
    print("\n=== gpu_check summary" + (" (CPU smoke run, toy sizes)" if args.tiny else "") + " ===")
    for name, status, detail in results:
        print(f"{status:4s}  {name:<20s} {detail}")
    n_fail = sum(s == "FAIL" for _, s, _ in results)
    print(f"gpu_check: {sum(s == 'PASS' for _, s, _ in results)} passed, {n_fail} failed, "
          f"{sum(s == 'SKIP' for _, s, _ in results)} skipped in {time.perf_counter() - t_start:.0f}s")  # fmt: skip
    return 1 if n_fail else 0


def verl_bench(args) -> tuple[str, str, str]:
    """scripts/bench_sft_step.py in verl's real SFT trainer: the steady-state ratio of EKSFT (fused head) to verl's
    own fused-kernel SFT. GPU: the qwen3-8b-trunc preset at the qwen3-8b recipe's token budget; CPU --tiny: a toy
    vocabulary, 1 warm-up + 2 timed steps (a smoke run of the same code path)."""
    probe = subprocess.run([sys.executable, "-c", "import verl"], capture_output=True, text=True, timeout=300)
    if probe.returncode:
        why = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return ("verl_sft_bench", "SKIP", f"verl does not import ({why}); ../shared/gpu-kit/README.md brings verl's "
                "one-process SFT stack to a bare GPU machine")
    if args.tiny:
        extra = ["--vocab", "4096", "--steps", "2", "--warmup", "1", "--device", "cpu" if args.cpu else "cuda",
                 "--variants", "verl-sft-fused,eksft-fused", "--seq-tokens", "256", "--micro-tokens", "512"]
    else:
        extra = ["--preset", "qwen3-8b-trunc", "--micro-tokens", str(_recipe_tokens()), "--device", "cuda"]
    cmd = [sys.executable, str(REPO / "scripts" / "bench_sft_step.py"), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        return ("verl_sft_bench", "FAIL", f"timed out after 900 s: {' '.join(cmd)}")
    print(r.stdout, flush=True)
    lines = r.stdout.strip().splitlines()
    last = lines[-1] if lines else "(no output)"
    if r.returncode or not last.startswith("eksft-fused vs verl-sft-fused:"):
        return ("verl_sft_bench", "FAIL", f"rc={r.returncode}: {(r.stderr.strip().splitlines() or [last])[-1][:300]}")
    return ("verl_sft_bench", "PASS", f"{last} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
