"""Benchmark the naive EKSFT loss against the fused head: wall time and peak memory, forward + backward.

    python scripts/bench_loss.py                       # CPU: N=4096, V=32768, d=512, fp32 (+ GPU sizes if CUDA)
    python scripts/bench_loss.py --N 2048 --V 16384 --d 256 --reps 2 --chunk-size 256

Variants (each one forward + backward of the LM head + loss):
    naive      logits = hidden @ W.T (grad), ref_logits = ref_hidden @ W_ref.T (no grad), eksft_loss(...)
    fused      fused_eksft_head(hidden, W, ref_hidden, W_ref, labels)           (eksft_pipeline/losses/fused.py)
    fused_sft  fused_eksft_head(..., rho=0): the same head as a plain fused cross-entropy (no pass 1)
On CUDA, ``liger_ce`` (Liger's LigerFusedLinearCrossEntropyLoss) is added when importable; the plain fused CE
reference is liger_ce if present, else fused_sft.

Peak-memory method.
  CPU: every variant runs once in its OWN subprocess (fresh allocator, no memory left over from another
  variant). After the inputs are allocated and touched, the worker reads its current resident set (VmRSS from
  /proc/self/status) as the baseline; after one forward + backward it reads ru_maxrss (the kernel's
  high-water mark of the resident set). Peak = ru_maxrss − baseline, i.e. the extra memory the computation
  needed on top of its inputs (it includes the gradients of hidden and weight, which both variants produce).
  If ru_maxrss was already above the baseline before the run (a transient during setup), the number would be
  an underestimate; the worker checks this and reports it.
  CUDA: in-process, torch.cuda.max_memory_allocated() − memory_allocated() after inputs, after
  reset_peak_memory_stats(), per variant.
Time: CPU — one more subprocess runs rounds of naive, fused, fused_sft in turn (round 0 is a warm-up) and
reports each variant's median over ``--reps`` rounds, so background load on a shared machine affects all
variants alike. CUDA — median of ``--reps`` repetitions after a warm-up, synchronised.
Targets (CPU): fused peak ≤ 25 % of naive at ≤ 1.3× naive time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the loss library without an install (GPU image)

import torch  # noqa: E402


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * (2.0 / d ** 0.5)).to(device=device, dtype=dtype).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.3 * torch.randn(n, d, generator=g).to(device)).to(dtype)
    ref_weight = (weight.detach().float() + 0.02 * torch.randn(v, d, generator=g).to(device)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, ref_hidden, ref_weight, labels


def run_variant(name: str, inputs, chunk_size: int) -> None:
    from eksft_pipeline.losses import eksft_loss, fused_eksft_head

    hidden, weight, ref_hidden, ref_weight, labels = inputs
    hidden.grad = weight.grad = None
    if name == "naive":
        logits = hidden @ weight.T
        with torch.no_grad():
            ref_logits = ref_hidden @ ref_weight.T
        loss, _ = eksft_loss(logits, ref_logits, labels)
        del ref_logits
    elif name == "fused":
        loss, _ = fused_eksft_head(hidden, weight, ref_hidden, ref_weight, labels, chunk_size=chunk_size)
    elif name == "fused_sft":
        loss, _ = fused_eksft_head(hidden, weight, None, None, labels, rho=0.0, chunk_size=chunk_size)
    elif name == "liger_ce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()(weight, hidden, labels)
    else:
        raise ValueError(f"unknown variant {name!r}")
    loss.backward()


def _rss_now_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


CPU_VARIANTS = ("naive", "fused", "fused_sft")


def cpu_memory_worker(args, variant: str) -> dict:
    inputs = make_inputs(args.N, args.V, args.d, torch.float32, "cpu")
    baseline = _rss_now_kib()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_variant(variant, inputs, args.chunk_size)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "peak_mib": (maxrss - baseline) / 1024,
            "setup_transient": maxrss_before > baseline + 1024 and maxrss <= maxrss_before}


def cpu_time_worker(args) -> dict:
    """Rounds of naive, fused, fused_sft in turn (round 0 = warm-up): background load hits all variants alike."""
    inputs = make_inputs(args.N, args.V, args.d, torch.float32, "cpu")
    times: dict[str, list[float]] = {v: [] for v in CPU_VARIANTS}
    for rnd in range(args.reps + 1):
        for variant in CPU_VARIANTS:
            t0 = time.perf_counter()
            run_variant(variant, inputs, args.chunk_size)
            if rnd:
                times[variant].append(time.perf_counter() - t0)
    return {v: {"time_s": statistics.median(t), "times": t} for v, t in times.items()}


def _worker(args, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--N", str(args.N), "--V", str(args.V),
           "--d", str(args.d), "--reps", str(args.reps), "--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_bench(args) -> dict:
    results = {v: _worker(args, f"mem:{v}") for v in CPU_VARIANTS}
    for v, r in _worker(args, "time").items():
        results[v].update(r)
    return results


def gpu_bench(args) -> dict:
    n, v, d = args.gpu_N, args.gpu_V, args.gpu_d
    inputs = make_inputs(n, v, d, torch.bfloat16, "cuda")
    variants = ["naive", "fused", "fused_sft"]
    try:
        import liger_kernel.transformers  # noqa: F401

        variants.append("liger_ce")
    except ImportError:
        pass
    results = {}
    for variant in variants:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        try:
            for rep in range(args.reps + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run_variant(variant, inputs, args.gpu_chunk_size)
                torch.cuda.synchronize()
                if rep:
                    times.append(time.perf_counter() - t0)
            results[variant] = {"time_s": statistics.median(times),
                                "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}
        except torch.OutOfMemoryError as e:  # the naive head may not fit; report it instead of dying
            results[variant] = {"error": f"OOM: {str(e).splitlines()[0]}"}
        inputs[0].grad = inputs[1].grad = None
    return results


def _ratio_lines(res: dict, ref: str, others: list[str]) -> list[str]:
    lines = []
    for o in others:
        if o not in res or "error" in res[o] or "error" in res.get(ref, {"error": 1}):
            continue
        lines.append(f"  {o:10s} / {ref:10s}: time {res[o]['time_s'] / res[ref]['time_s']:.2f}x   "
                     f"peak memory {res[o]['peak_mib'] / res[ref]['peak_mib']:.1%}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--V", type=int, default=32768)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=None, help="fused chunk rows (default: the library's)")
    ap.add_argument("--gpu-N", type=int, default=16384)
    ap.add_argument("--gpu-V", type=int, default=151936)
    ap.add_argument("--gpu-d", type=int, default=4096)
    ap.add_argument("--gpu-chunk-size", type=int, default=None)
    ap.add_argument("--no-gpu", action="store_true", help="skip the CUDA part even if CUDA is available")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from eksft_pipeline.losses import DEFAULT_CHUNK
    from eksft_pipeline.losses.fused import CUDA_DEFAULT_CHUNK

    args.chunk_size = args.chunk_size or DEFAULT_CHUNK
    args.gpu_chunk_size = args.gpu_chunk_size or CUDA_DEFAULT_CHUNK
    if args.worker:
        torch.manual_seed(0)
        mode = args.worker
        print(json.dumps(cpu_time_worker(args) if mode == "time" else cpu_memory_worker(args, mode.split(":", 1)[1])))
        return

    print(f"CPU  N={args.N} V={args.V} d={args.d} fp32, threads={torch.get_num_threads()}, "
          f"chunk={args.chunk_size}, reps={args.reps} (median of interleaved rounds), fwd+bwd, "
          "memory: one subprocess per variant")
    res = cpu_bench(args)
    for k, r in res.items():
        flag = "  (WARNING: setup transient above baseline, peak may be underestimated)" if r["setup_transient"] \
            else ""
        rounds = ", ".join(f"{x:.2f}" for x in r["times"])
        print(f"  {k:10s} time {r['time_s']:7.3f} s (rounds: {rounds})   peak +{r['peak_mib']:8.1f} MiB{flag}")
    for line in _ratio_lines(res, "naive", ["fused", "fused_sft"]):
        print(line)
    for line in _ratio_lines(res, "fused_sft", ["fused"]):
        print(line)
    t_ok = res["fused"]["time_s"] <= 1.3 * res["naive"]["time_s"]
    m_ok = res["fused"]["peak_mib"] <= 0.25 * res["naive"]["peak_mib"]
    print(f"  targets: memory <= 25% of naive: {'met' if m_ok else 'MISSED'}; "
          f"time <= 1.3x naive: {'met' if t_ok else 'MISSED'}")

    if torch.cuda.is_available() and not args.no_gpu:
        print(f"CUDA {torch.cuda.get_device_name()}  N={args.gpu_N} V={args.gpu_V} d={args.gpu_d} bf16, "
              f"chunk={args.gpu_chunk_size}, max_memory_allocated above the inputs")
        g = gpu_bench(args)
        for k, r in g.items():
            print(f"  {k:10s} " + (r["error"] if "error" in r else
                                   f"time {r['time_s']:7.3f} s   peak +{r['peak_mib']:9.1f} MiB"))
        for line in _ratio_lines(g, "naive", ["fused", "fused_sft", "liger_ce"]):
            print(line)
        plain = "liger_ce" if "liger_ce" in g else "fused_sft"
        for line in _ratio_lines(g, plain, ["fused"]):
            print(line)
    else:
        print("CUDA not available: GPU sizes skipped")


if __name__ == "__main__":
    main()
