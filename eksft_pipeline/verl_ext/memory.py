"""Per-GPU peak-memory estimates of the SFT and RL stages, printed by the dry run and checked before a launch.

    python -m eksft_pipeline stage=sft model=qwen3-8b cluster=8gpu dry_run=true    # prints terms + assumptions
    make reproduce MODEL=qwen3-8b DRY_RUN=1

A pure module (arithmetic only, no torch): the stages build the inputs from their verl configs
(`eksft_pipeline/sft/stage.py`, `eksft_pipeline/rl/stage.py`); a configuration whose estimate exceeds the GPU's
usable memory is refused with a message naming the knob to turn. `scripts/gpu_check.py` measures the SFT step of a
truncated Qwen3-8B-shaped model on one GPU and prints measured / estimated; `tests/verl_ext/test_memory.py`
measures the loss head at V = 151,936 on CPU against :func:`loss_head_peak`.

SFT model (verl 0.9.1 FSDP2 engine, `eksft_pipeline/verl_ext/sft_trainer.py`), per GPU, micro-batch of M packed tokens
(with dynamic batching verl packs up to `data.max_token_len_per_gpu` x s), W ranks (FSDP shards over all of them),
Ulysses sequence parallelism of size s (`engine.ulysses_sequence_parallel_size`: each rank of an SP group holds
N = M / s rows of every packed micro-batch, W / s data-parallel ranks), P parameters, L layers, d hidden,
V vocabulary:

* model states: fp32 master weights + AdamW m, v -> (4 + 8) P / W (verl trains with `engine.model_dtype=fp32`;
  FSDP2 shards both), plus fp32 gradients (4 P / W) in the backward moments only (verl zeroes them with
  set_to_none after every step, so the forward and the loss head run without them).
* unsharded parameters: FSDP2 all-gathers one decoder layer at a time and prefetches the next (2 layers in the
  compute dtype); the root unit (lm_head, plus the embedding when tied) stays gathered from its forward to the
  end of backward.
* gradients in flight: the lm_head's unsharded gradient (compute dtype) lives from the head's backward to the
  root unit's reduce-scatter at the end; one layer's unsharded gradient is cast to fp32 for its reduce-scatter.
* activations: with gradient checkpointing each layer keeps its input [N, d]; the layer being recomputed holds
  its forward intermediates (q, k, v and their rotary copies, attention output, norm outputs, gate, up,
  act(gate), act(gate)*up: 4 q_dim + 4 kv_dim + 6 d + 4 I per token) and about as much again for their
  gradients. Without checkpointing every layer keeps its forward intermediates.
* reference model: verl forces a forward-only engine into FSDP CPU offload (pinned host memory), so on the GPU
  it needs two gathered layers and one layer's forward intermediates while it runs; its weights cost
  P x bytes / W of pinned HOST memory per rank (bf16 with `eksft.ref_model_dtype=bf16`, else fp32).
* loss head (:func:`loss_head_peak`), the largest term at Qwen3's vocabulary:
  naive (today's training pass: verl hands the policy logits [N, V] to the loss, the reference logits of the
  same rows come from a second forward; `losses/base.py: linear_compute`), the largest of three moments --
  log-softmax: policy logits (b bytes) + reference logits (b) + fp32 upcast (if b < 4) + fp32 log p;
  H/KL rows: logits (2b) + log p (4) + for the selected fraction f of rows the saved log p rows and p (2 x 4)
  and, with the reference, the ref rows' log q, log p - log q and the product p·(...) (3 x 4; without it p·log p);
  backward: log p + its gradient + the log-softmax input gradient (3 x 4), + b for the gradient's cast;
  fused (`losses/fused.py`, chunks of C rows, no [N, V] tensor): on CPU / eager 5 fp32 [C, V] buffers
  (z, log p, p, z_ref, log q) + 2 [C, V] low-precision matmul outputs when b < 4; on CUDA with bf16 the
  compiled chunk math: z, z_ref, g in bf16 + two fp32 [C, V] temporaries (10 bytes per C x V element); plus the
  fp32 lm_head gradient [V, d] it accumulates and the policy / reference hidden states [N, d].
  f = the fraction of rows with an entropy/KL term and whether the reference logits are in the training pass are
  the loss's own declarations (`TokenLoss.selected_fraction`, `.ref_in_compute`, `.needs_ref`, `.resolve_head`
  in losses/base.py), read from the loss object the stage built: e.g. EKSFT's M = top-k(H) U top-k(KL) has at
  most 2 rho |T| rows, so f = min(1, 2 rho) (the worst case); a CE-only loss 0. This module keeps no table of
  losses (tests/losses/test_loss_facts.py measures each declaration from the loss's gradients).
* sequence parallelism (s > 1): every per-token term above is per rank, so it counts N = M / s rows; the
  all-to-all of each attention layer adds transient copies of its q, k, v (k, v repeated up to s heads) and output
  (2 q_dim + 2 kv_dim' per row, compute dtype).
* reference hidden states of the step (`RefSide`): the final hidden states of the data-parallel rank's response
  rows [R, d] (compute dtype) wait on the device from the reference forward to the training pass (pruned after the
  plan; counted whole: the worst case), R = the rank's sequences x the cutoff (worst case). With SP every rank of
  the group keeps the whole rank's rows (gathered). `eksft.ref_hidden_store=host` moves them to host memory.
* allocator slack: 10 % of the peak moment's dynamic terms (dynamic batching varies N from one micro-batch to the
  next, so the caching allocator holds blocks sized for other shapes);
* runtime: CUDA context and NCCL buffers, a fixed 2 GiB.

Peak = states + unsharded params + max(forward moments, backward moments). The RL stage (verl's V1 sync trainer,
colocated vLLM rollout) is the larger of its training phase (actor states + activations at
`ppo_max_token_len_per_gpu` + logits [N, V] bf16 + an fp32 [N, V] for log-probs / entropy) and its rollout phase
(vLLM's `gpu_memory_utilization` share + the actor's parameters and optimizer state, which stay on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the loss object is only read (duck-typed): this module stays free of torch
    from eksft_pipeline.losses.base import TokenLoss

GIB = 1024**3
# fragmentation of the caching allocator: micro-batches of varying size (dynamic batching) reuse blocks sized for
# other [N, V] / [N, d] shapes; the share of the moment's dynamic terms the estimate adds for it
SLACK = 0.10


class MemoryBudgetError(ValueError):
    """A stage's estimated per-GPU peak exceeds the GPU's usable memory (the message names the knob)."""
RUNTIME_BYTES = 2 * GIB
# CUDA compiled fused head: bytes per chunk x V element (bf16 z, z_ref, g + two fp32 temporaries)
FUSED_CUDA_BYTES_PER_ELEM = 10
FUSED_DEFAULT_CHUNK = {"cuda": 4096, "cpu": 512}  # losses/fused.py CUDA_DEFAULT_CHUNK / DEFAULT_CHUNK


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only transformer (HF Qwen3 config field names in from_hf_config)."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> ModelShape:
        heads = int(c["num_attention_heads"])
        return cls(
            vocab=int(c["vocab_size"]), hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]),
            intermediate=int(c["intermediate_size"]), heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            tied=bool(c.get("tie_word_embeddings", False)),
        )  # fmt: skip

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        d = self.hidden
        attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d + 2 * self.head_dim  # q, k, v, o, q/k norms
        return attn + 3 * d * self.intermediate + 2 * d  # gate, up, down, two RMSNorms

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def n_params(self) -> int:
        return self.layers * self.layer_params + self.embed_params * (1 if self.tied else 2) + self.hidden

    def layer_act_elems(self) -> int:
        """Forward intermediates of one decoder layer per token (see the module docstring)."""
        return 4 * self.q_dim + 4 * self.kv_dim + 6 * self.hidden + 4 * self.intermediate


@dataclass
class Term:
    name: str
    bytes: float
    formula: str

    def line(self) -> str:
        return f"  {self.name:<44s} {self.bytes / GIB:8.2f} GiB   {self.formula}"


@dataclass
class Estimate:
    """A per-GPU estimate: the terms that make up the peak, the assumptions, and the knob that lowers it."""

    stage: str
    terms: list[Term]
    assumptions: list[str]
    knob: str
    device: str = "cuda"
    capacity_bytes: float | None = None  # usable device memory; None = not checked (CPU)
    host_terms: list[Term] = field(default_factory=list)
    loss_terms: dict[str, Any] = field(default_factory=dict)  # what the estimate read from the loss object

    @property
    def total(self) -> float:
        return float(sum(t.bytes for t in self.terms))

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.total <= self.capacity_bytes

    def lines(self) -> list[str]:
        cap = "" if self.capacity_bytes is None else f" of {self.capacity_bytes / GIB:.1f} GiB usable"
        out = [f"{self.stage}: estimated peak {self.total / GIB:.1f} GiB per {self.device} device{cap}"]
        out += [t.line() for t in self.terms]
        if self.host_terms:
            out.append("  host memory per rank:")
            out += ["  " + t.line() for t in self.host_terms]
        out.append("  assumptions:")
        out += [f"    - {a}" for a in self.assumptions]
        if self.capacity_bytes is not None:
            out.append(f"  to lower it: {self.knob}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "device": self.device,
            "peak_gib": round(self.total / GIB, 2),
            "capacity_gib": None if self.capacity_bytes is None else round(self.capacity_bytes / GIB, 2),
            "fits": self.fits,
            "terms": {t.name: {"gib": round(t.bytes / GIB, 3), "formula": t.formula} for t in self.terms},
            "host_terms": {t.name: {"gib": round(t.bytes / GIB, 3), "formula": t.formula} for t in self.host_terms},
            "loss_terms": self.loss_terms,
            "assumptions": self.assumptions, "knob": self.knob, "text": "\n".join(self.lines()),
        }  # fmt: skip

    def check(self) -> None:
        """Raise MemoryBudgetError (with the terms and the knob) if the estimate exceeds the usable memory."""
        if not self.fits:
            raise MemoryBudgetError(
                f"{self.stage}: the estimated peak of {self.total / GIB:.1f} GiB per GPU exceeds the "
                f"{self.capacity_bytes / GIB:.1f} GiB usable (cluster.gpu_memory_gib x cluster.memory_headroom); "
                f"{self.knob}\n" + "\n".join(self.lines())
            )


# ----------------------------------------------------------------------------------------------- loss head


def loss_head_peak(
    n: int,
    vocab: int,
    *,
    head: str = "naive",
    logits_bytes: int = 2,
    frac: float = 0.4,
    with_ref: bool = True,
    hidden: int = 0,
    chunk: int | None = None,
    device: str = "cuda",
    include_param_grads: bool = False,
) -> tuple[float, list[Term]]:
    """Peak extra memory of the LM head + loss (forward and backward) for N rows; (bytes, terms at the peak).

    ``include_param_grads`` adds the gradients of the head's inputs (hidden [N, d] and weight [V, d]), which the
    SFT estimate counts elsewhere (FSDP gradient terms).
    """
    b = int(logits_bytes)
    nv = float(n) * vocab
    m = frac * nv
    terms: list[Term] = []
    if head == "naive":
        upcast = 4 if b < 4 else 0
        r = 1 if with_ref else 0
        moments = {
            "log-softmax": [("policy logits", b * nv, f"N*V*{b}"), ("reference logits", r * b * nv, f"N*V*{b}"),
                            ("fp32 upcast", upcast * nv, f"N*V*{upcast}"), ("log p (fp32, saved)", 4 * nv, "N*V*4")],
            "entropy/KL rows": [("policy logits", b * nv, f"N*V*{b}"), ("reference logits", r * b * nv, f"N*V*{b}"),
                                ("log p (fp32, saved)", 4 * nv, "N*V*4"),
                                ("selected rows: log p, p (saved)", 8 * m, f"{frac:g}*N*V*8"),
                                ("selected rows: log q, log p-log q, p*(..)" if r else "selected rows: p*log p",
                                 (12 if r else 4) * m, f"{frac:g}*N*V*{12 if r else 4}")],
            "backward": [("log p (fp32, saved)", 4 * nv, "N*V*4"), ("grad of log p", 4 * nv, "N*V*4"),
                         ("grad of the logits (fp32)", 4 * nv, "N*V*4")],
            "backward cast": [("grad of the logits (fp32)", 4 * nv, "N*V*4"),
                              ("grad of the logits (compute dtype)", b * nv if b < 4 else 0, f"N*V*{b}")],
        }  # fmt: skip
        name, items = max(moments.items(), key=lambda kv: sum(x[1] for x in kv[1]))
        terms = [Term(f"loss head (naive, {name}): {t}", v, f) for t, v, f in items if v]
    elif head == "fused":
        c = int(chunk or FUSED_DEFAULT_CHUNK["cuda" if device == "cuda" else "cpu"])
        c = max(1, min(c, n))
        cv = float(c) * vocab
        if device == "cuda" and b < 4:
            terms.append(Term("loss head (fused): compiled chunk buffers", FUSED_CUDA_BYTES_PER_ELEM * cv,
                              f"C*V*{FUSED_CUDA_BYTES_PER_ELEM}, C={c}"))
        else:
            terms.append(Term("loss head (fused): fp32 chunk buffers", 5 * 4 * cv, f"C*V*20, C={c}"))
            if b < 4:
                terms.append(Term("loss head (fused): low-precision matmul outputs", 2 * b * cv, f"C*V*{2 * b}"))
        terms.append(Term("loss head (fused): lm_head grad accumulator (fp32)", 4.0 * vocab * hidden, "V*d*4"))
        terms.append(Term("loss head (fused): policy + reference hidden", 2.0 * b * n * hidden, f"2*N*d*{b}"))
    else:
        raise ValueError(f"unknown loss head {head!r} (naive, fused)")
    if include_param_grads:
        terms.append(Term("grad of the head's input hidden [N, d]", float(b) * n * hidden, f"N*d*{b}"))
        if head == "naive":
            terms.append(Term("grad of the head weight [V, d]", float(b) * vocab * hidden, f"V*d*{b}"))
    return float(sum(t.bytes for t in terms)), terms


# ------------------------------------------------------------------------------------------------ stages


def _dtype_bytes(name: str | None, default: int) -> int:
    if name is None:
        return default
    s = str(name).lower()
    if s in ("fp32", "float32", "float"):
        return 4
    if s in ("bf16", "bfloat16", "fp16", "float16", "half"):
        return 2
    raise ValueError(f"unknown dtype {name!r}")


def sft_estimate(
    shape: ModelShape,
    *,
    tokens: int,
    world: int,
    loss: TokenLoss,
    head: str | None = "auto",
    model_dtype: str = "fp32",
    compute_dtype: str = "bf16",
    ref_dtype: str | None = None,
    grad_ckpt: bool = True,
    chunk: int | None = None,
    device: str = "cuda",
    capacity_bytes: float | None = None,
    knob: str = "lower data.max_token_len_per_gpu (model.sft.verl.data.max_token_len_per_gpu)",
    sp: int = 1,
    ref_store_rows: int = 0,
    ref_store_on_host: bool = False,
) -> Estimate:
    """Peak memory per GPU of one EKSFT / baseline SFT step (see the module docstring for every term).

    ``tokens``: packed tokens of one micro-batch (M; each of the ``sp`` ranks of a sequence-parallel group holds
    ceil(M / sp) of them). ``ref_store_rows``: response rows of a data-parallel rank's batch whose reference hidden
    states wait for the training pass (0: not counted), on the device unless ``ref_store_on_host``.
    ``loss`` is the built loss object (``eksft_pipeline.losses.get_loss``): the estimate reads what it declares
    (reference model, reference logits in the training pass, selected fraction, the head ``head`` resolves to).
    """
    P, L, d, V = shape.n_params, shape.layers, shape.hidden, shape.vocab
    sp = int(sp)
    if sp < 1 or world % sp:
        raise ValueError(f"sequence parallel size {sp} must divide the {world} ranks")
    N = -(-int(tokens) // sp)  # rows per rank
    pb = _dtype_bytes(model_dtype, 4)
    cb = _dtype_bytes(compute_dtype, 2)
    rb = _dtype_bytes(ref_dtype, pb)
    head = loss.resolve_head(head)
    needs_ref = bool(loss.needs_ref)
    frac = float(loss.selected_fraction)
    with_ref = needs_ref and bool(loss.ref_in_compute)
    loss_terms = {"loss": loss.name, "head": head, "needs_ref": needs_ref, "ref_in_training_pass": with_ref,
                  "selected_fraction": frac}  # fmt: skip
    lp = shape.layer_params
    root = shape.embed_params + d  # lm_head (or the tied embedding) + final norm
    terms = [
        Term("model states (params + AdamW m, v)", (pb + 8) * P / world, f"({pb}+8)*P/W, P={P / 1e9:.2f}B, W={world}"),
        Term("unsharded params (2 layers + root unit)", cb * (2 * lp + root), f"{cb}*(2*layer+lm_head)"),
    ]  # fmt: skip
    # sharded gradients exist from the backward on (verl zeroes them with set_to_none after each step)
    grads = Term("sharded gradients", float(pb) * P / world, f"{pb}*P/W")
    act = shape.layer_act_elems()
    ckpt = Term("activations: layer inputs (checkpointed)", float(cb) * L * N * d, f"{cb}*L*N*d, N={N}") if grad_ckpt \
        else Term("activations: every layer's intermediates", float(cb) * L * N * act, f"{cb}*L*N*{act}")
    layer_ws = Term("activations: one layer recomputed + its grads", 2.0 * cb * N * act, f"2*{cb}*N*{act}")
    a2a = None
    if sp > 1:
        kv_dim = max(shape.kv_heads, sp) * shape.head_dim  # verl repeats k, v up to sp heads
        a2a = Term("Ulysses all-to-all copies (q, k, v, out of a layer)", float(cb) * N * (2 * shape.q_dim + 2 * kv_dim),
                   f"{cb}*N*(2*q_dim+2*kv_dim), s={sp}")  # fmt: skip
    store = None
    if needs_ref and ref_store_rows:
        store = Term("reference hidden states of the rank's batch", float(cb) * ref_store_rows * d,
                     f"{cb}*R*d, R={int(ref_store_rows)}")  # fmt: skip
    head_fwd, head_terms = loss_head_peak(N, V, head=head, logits_bytes=cb, frac=frac, with_ref=with_ref,
                                          hidden=d, chunk=chunk, device=device)  # fmt: skip
    lm_grad = Term("lm_head grad in flight (to the final reduce)", float(cb) * shape.embed_params, f"{cb}*V*d")
    layer_grad = Term("one layer's grad: unsharded + fp32 reduce buffer", (cb + 4.0) * lp, f"({cb}+4)*layer")
    ref_fwd = Term("reference forward: 2 gathered layers + 1 layer's forward", cb * 2.0 * lp + float(cb) * N * act,
                   f"{cb}*2*layer + {cb}*N*{act}") if needs_ref else None  # fmt: skip
    logits_t = Term("policy logits", float(cb) * N * V, f"{cb}*N*V") if head == "naive" else \
        Term("policy hidden", float(cb) * N * d, f"{cb}*N*d")
    on_device = [store] if (store is not None and not ref_store_on_host) else []
    moments = {
        "loss head": [ckpt, *head_terms, *on_device],
        "reference forward": [ckpt, logits_t, *([ref_fwd] if ref_fwd else []), *([a2a] if a2a else []), *on_device],
        "layer backward": [ckpt, layer_ws, *([a2a] if a2a else []), lm_grad, layer_grad, grads, *on_device],
    }
    if head == "fused":
        moments["layer backward"].append(next(t for t in head_terms if "grad accumulator" in t.name))
    name, items = max(moments.items(), key=lambda kv: sum(t.bytes for t in kv[1]))
    terms += [Term(f"[{name}] {t.name}", t.bytes, t.formula) for t in items]
    dynamic = sum(t.bytes for t in items if t is not grads)
    terms.append(Term("allocator slack (dynamic batching varies N)", SLACK * dynamic, f"{SLACK:g} x the [{name}] terms"))
    terms.append(Term("runtime (CUDA context, NCCL buffers)", RUNTIME_BYTES, "2 GiB"))
    assumptions = [
        f"micro-batch of M={int(tokens)} packed tokens (dynamic batching: data.max_token_len_per_gpu x s), "
        f"N={N} of them per rank (Ulysses sequence parallelism s={sp})",
        f"FSDP2 over W={world} ranks ({world // sp} data-parallel), master weights {model_dtype}, compute "
        f"{compute_dtype}, AdamW fp32 states",
        f"gradient checkpointing {'on' if grad_ckpt else 'off'}; flash-attention (no N^2 attention matrix)",
        f"loss {loss.name!r}: {head} head, {frac:.0%} of rows with an entropy/KL term (worst case), reference logits "
        f"{'in' if with_ref else 'not in'} the training pass",
        "the peak is the largest of the moments 'loss head', 'reference forward' and 'layer backward'; the term "
        f"list shows the largest ({name})",
        "reference model: forward-only engine, FSDP CPU offload forced by verl (pinned host memory)"
        if needs_ref else f"no reference model (loss {loss.name!r} does not use one)",
    ]
    host = [Term("reference weights, pinned (CPU offload)", float(rb) * P / world, f"{rb}*P/W")] if needs_ref else []
    if store is not None:
        assumptions.append(f"reference hidden states of the rank's batch: R={int(ref_store_rows)} rows (its sequences "
                           f"x the cutoff, the worst case) on the {'host' if ref_store_on_host else 'device'}")
        if ref_store_on_host:
            host.append(store)
    return Estimate("sft", terms, assumptions, knob, device=device, capacity_bytes=capacity_bytes, host_terms=host,
                    loss_terms=loss_terms)


def rl_estimate(
    shape: ModelShape,
    *,
    tokens: int,
    world: int,
    gpu_memory_bytes: float,
    gpu_memory_utilization: float,
    grad_ckpt: bool = True,
    capacity_bytes: float | None = None,
) -> Estimate:
    """Peak memory per GPU of a colocated DAPO step (actor training phase vs vLLM rollout phase)."""
    P, L, d, V = shape.n_params, shape.layers, shape.hidden, shape.vocab
    N = int(tokens)
    act = shape.layer_act_elems()
    lp = shape.layer_params
    train = [
        Term("actor states (fp32 params + grads + AdamW)", 16.0 * P / world, f"16*P/W, W={world}"),
        Term("unsharded params (2 layers + root unit)", 2.0 * (2 * lp + shape.embed_params), "2*(2*layer+lm_head)"),
        Term("activations: layer inputs (checkpointed)" if grad_ckpt else "activations: all layers",
             2.0 * L * N * (d if grad_ckpt else act), f"2*L*N*{'d' if grad_ckpt else act}, N={N}"),
        Term("activations: one layer recomputed + its grads", 4.0 * N * act, f"4*N*{act}"),
        Term("logits (bf16) + fp32 log-prob / entropy working copy", 6.0 * N * V, "N*V*(2+4)"),
        Term("runtime (CUDA context, NCCL, sleeping vLLM)", RUNTIME_BYTES, "2 GiB"),
    ]  # fmt: skip
    train.insert(-1, Term("allocator slack (dynamic batching varies N)", SLACK * sum(t.bytes for t in train[2:5]),
                          f"{SLACK:g} x activations + logits"))  # fmt: skip
    rollout = [
        Term("vLLM (weights + KV cache + activations)", gpu_memory_utilization * gpu_memory_bytes,
             f"gpu_memory_utilization={gpu_memory_utilization:g} x {gpu_memory_bytes / GIB:.1f} GiB"),
        Term("actor params + AdamW (kept on the GPU)", 12.0 * P / world, "12*P/W"),
    ]  # fmt: skip
    t_train, t_roll = sum(t.bytes for t in train), sum(t.bytes for t in rollout)
    phase, items = ("training", train) if t_train >= t_roll else ("rollout", rollout)
    other = t_roll if phase == "training" else t_train
    assumptions = [
        f"colocated actor and vLLM rollout on every GPU (verl V1 sync trainer); shown: the {phase} phase "
        f"(the other phase: {other / GIB:.1f} GiB)",
        f"actor micro-batch of N={N} tokens (actor.ppo_max_token_len_per_gpu), FSDP over W={world} ranks",
        "vLLM sleeps (weights and KV cache released) during training; DAPO builds no reference model",
    ]
    knob = ("lower actor_rollout_ref.actor.ppo_max_token_len_per_gpu (model.rl.verl...)" if phase == "training"
            else "lower actor_rollout_ref.rollout.gpu_memory_utilization (model.rl.verl...)")
    return Estimate("rl", [Term(f"[{phase}] {t.name}", t.bytes, t.formula) for t in items], assumptions, knob,
                    capacity_bytes=capacity_bytes)  # fmt: skip


def shape_from_model(path: str, arch: dict[str, Any] | None = None) -> ModelShape | None:
    """The model's shape from ``<path>/config.json`` when ``path`` is a local directory, else from ``arch``
    (the recipe's ``model.arch``, HF config field names); None when neither is available."""
    import json
    from pathlib import Path

    cfg_file = Path(str(path)).expanduser() / "config.json"
    if cfg_file.is_file():
        return ModelShape.from_hf_config(json.loads(cfg_file.read_text()))
    return ModelShape.from_hf_config(dict(arch)) if arch else None


def usable_bytes(gpu_memory_gib: float | None, headroom: float = 0.9) -> float | None:
    """The share of a GPU's memory an estimate may use (None: not checked)."""
    if gpu_memory_gib in (None, 0):
        return None
    return float(gpu_memory_gib) * GIB * float(headroom)


__all__ = [
    "SLACK",
    "Estimate",
    "GIB",
    "MemoryBudgetError",
    "ModelShape",
    "Term",
    "loss_head_peak",
    "rl_estimate",
    "sft_estimate",
    "shape_from_model",
    "usable_bytes",
]
