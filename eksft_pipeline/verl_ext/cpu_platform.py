"""A `cpu` platform for verl 0.9.1, so the embedded CPU default runs verl's real trainers.

verl resolves its accelerator through `verl.plugin.platform` (a registry of `PlatformBase`
subclasses; `nvidia`, `npu`, `rocm` are built in). Nothing is registered for a machine with no
accelerator, so `get_platform()` falls back to `nvidia` and every CUDA call fails. This module
registers a `cpu` platform (device "cpu", gloo collectives, a stub device module whose memory
and stream calls are no-ops) and is switched on ONLY by the `cluster=cpu` config, which sets

    VERL_USE_EXTERNAL_MODULES=eksft_pipeline.verl_ext.cpu_platform   # verl imports us in every process
    VERL_PLATFORM=cpu                                                # and selects this platform
    VERL_ENGINE_DEVICE=cuda VERL_ENGINE_VENDOR=nvidia                # verl's FSDP engine is registered
                                                                     # for device "cuda": reuse it as is

(see `cpu_env()`). Because verl imports `VERL_USE_EXTERNAL_MODULES` from its own `__init__`, the
shim is active in torchrun ranks and in Ray worker processes alike. On a GPU node none of these
variables are set and this module is never imported.

Two things cannot be expressed through the platform interface and are patched here, narrowly:
- verl builds the process-group backend string as f"cpu:gloo,{device}:{backend}", which is
  "cpu:gloo,cpu:gloo" here and rejected by torch (duplicate device). `torch.distributed.
  init_process_group` is wrapped to turn exactly that string into "gloo".
- `torch.cpu` lacks the CUDA memory/stream API verl calls (`max_memory_allocated`, `mem_get_info`,
  `Stream`, ...): `CPUDeviceModule` answers them with CPU-true values (0 bytes of device memory,
  psutil for free/total host memory) and no-op streams.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

SHIM_MODULE = "eksft_pipeline.verl_ext.cpu_platform"


def cpu_env() -> dict[str, str]:
    """Environment variables that switch verl onto this platform (set by `cluster=cpu`)."""
    return {
        "VERL_USE_EXTERNAL_MODULES": SHIM_MODULE,
        "VERL_PLATFORM": "cpu",
        "VERL_ENGINE_DEVICE": "cuda",
        "VERL_ENGINE_VENDOR": "nvidia",
        # verl's SFT trainer asks for `cuda` by name in a few places (pin_memory_device, tracking);
        # an empty CUDA_VISIBLE_DEVICES makes any accidental CUDA call fail loudly instead of hanging.
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
    }


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def wait(self, *args, **kwargs):
        return None

    def query(self):
        return True


class CPUDeviceModule(ModuleType):
    """`torch.cpu` plus the CUDA-only calls verl makes, answered truthfully for a CPU.

    Device memory counters are 0 (there is no device memory); `mem_get_info` reports host memory.
    Unknown attributes fall through to `torch.cpu` so a missing one raises AttributeError naming it.
    """

    def __init__(self):
        super().__init__("eksft_cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    # -- device bookkeeping -------------------------------------------------------------------
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, index) -> None:
        return None

    def get_device_name(self, index=None) -> str:
        return "cpu"

    def synchronize(self, device=None) -> None:
        return None

    # -- memory -------------------------------------------------------------------------------
    def empty_cache(self) -> None:
        return None

    def ipc_collect(self) -> None:
        return None

    def memory_allocated(self, device=None) -> int:
        return 0

    def memory_reserved(self, device=None) -> int:
        return 0

    def max_memory_allocated(self, device=None) -> int:
        return 0

    def max_memory_reserved(self, device=None) -> int:
        return 0

    def reset_peak_memory_stats(self, device=None) -> None:
        return None

    def set_per_process_memory_fraction(self, fraction, device=None) -> None:
        return None

    def mem_get_info(self, device=None) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    # -- RNG ------------------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self, device=None):
        return torch.get_rng_state()

    def set_rng_state(self, state, device=None) -> None:
        torch.set_rng_state(state)

    # -- streams --------------------------------------------------------------------------------
    Stream = _NullStream
    Event = _NullEvent

    def current_stream(self, device=None):
        return _NullStream()

    def stream(self, stream=None):
        return contextlib.nullcontext()

    # mirrors torch.cuda.memory._set_allocator_settings for set_allocator_settings callers
    memory = SimpleNamespace(_set_allocator_settings=lambda settings: None)


_DEVICE_MODULE = CPUDeviceModule()


def _register_platform():
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    if PlatformRegistry.get("cpu") is not None:
        return PlatformRegistry.get("cpu")

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        """verl platform for a machine with no accelerator: device "cpu", gloo collectives."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self):
            return _DEVICE_MODULE

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            # Never auto-detected: only VERL_PLATFORM=cpu selects it.
            return False

        def current_device(self):
            # verl passes this to `.to(...)`/`torch.device(...)`; an int would mean "accelerator 0"
            # to torch, so answer with the CPU device name instead.
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index=None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # Ray sets CUDA_VISIBLE_DEVICES for GPU bundles; on CPU nothing is visible.
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            # Logical GPUs: the CPU Ray cluster is started with `num_gpus=N` so verl's resource
            # pools (which count accelerators) can be placed; nothing touches CUDA.
            return "GPU"

        def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
            return {"num_gpus": num_gpus}

        def ray_noset_envvars(self) -> list[str]:
            return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self):
            return None

    return PlatformCPU


def _patch_process_group_backend():
    """verl asks for "cpu:gloo,cpu:gloo" here; torch wants one entry per device type."""
    import torch.distributed as dist

    if getattr(dist.init_process_group, "_eksft_cpu_patched", False):
        return
    original = dist.init_process_group

    @functools.wraps(original)
    def init_process_group(*args, **kwargs):
        backend = kwargs.get("backend")
        if backend is None and args:
            backend = args[0]
        if isinstance(backend, str) and backend.replace(" ", "") in ("cpu:gloo,cpu:gloo", "cpu:gloo"):
            if "backend" in kwargs:
                kwargs["backend"] = "gloo"
            else:
                args = ("gloo",) + tuple(args[1:])
        return original(*args, **kwargs)

    init_process_group._eksft_cpu_patched = True
    dist.init_process_group = init_process_group


def patch_fsdp2_offload_pinning() -> None:
    """verl gives every forward-only FSDP2 engine (the reference model) `CPUOffloadPolicy(pin_memory=True)`.

    Pinning needs an accelerator; on the CPU platform the parameters already live in host memory, so
    the policy is kept and only pinning is turned off. Called by the trainers when the platform is
    `cpu` (importing verl's FSDP engine here, at verl import time, would be circular).
    """
    from verl.workers.engine.fsdp import transformer_impl as ti

    policy = ti.CPUOffloadPolicy
    if getattr(policy, "_eksft_no_pin", False) or policy is None:
        return

    def cpu_offload_policy(*args, **kwargs):
        kwargs["pin_memory"] = False
        return policy(*args, **kwargs)

    cpu_offload_policy._eksft_no_pin = True
    ti.CPUOffloadPolicy = cpu_offload_policy


def install() -> None:
    """Register the platform and patch the backend string. Idempotent."""
    _register_platform()
    _patch_process_group_backend()


def is_active() -> bool:
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


# Imported by verl through VERL_USE_EXTERNAL_MODULES: register on import.
if is_active():
    install()
