"""Where and how a run executes, in one place: device, DDP, mixed precision, seeds and RNG states.

Distributed runs come from torchrun only, which sets RANK, WORLD_SIZE and LOCAL_RANK:

    $ torchrun --nproc_per_node=4 -m cocoshard train --shards shards

NCCL joins the processes on CUDA, gloo on a CPU. Mixed precision is bf16 wherever the device has
it (recent GPUs, and CPUs: autocast on a CPU only does bf16 well) and fp16 with a GradScaler on
GPUs without bf16. Seeds for per-epoch randomness are derived from (seed, epoch, rank) so that a
resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cocoshard.errors import ConfigError, UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """The device, this process's place in the job, and the autocast dtype (None: full precision)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None

    @property
    def distributed(self) -> bool:
        """True when torchrun started several processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints and writes files."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is active only for fp16, the one dtype whose gradients underflow."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


# ----------------------------------------------------------------------------------- resolution


def resolve_device(choice: str) -> torch.device:
    """ "auto" → CUDA when available, else the CPU; "cuda" without a GPU is a config error."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    if choice not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda (got {choice!r})")
    return torch.device(choice)


def cpu_bf16_is_native() -> bool:
    """Whether this CPU computes in bf16 natively (oneDNN's AVX512 / AMX kernels). Without them
    autocast emulates bf16: on a 2-core AVX2 EPYC a training step of resnet18 at 224 px took ~10x
    as long in bf16 as in float32, and cocoshard_tiny's 12x."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp_dtype(amp: bool, choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp/--amp-dtype` on `device`, or None for full precision.

    On a CPU, `auto` is bf16 only where the CPU computes it natively (float32 is faster elsewhere);
    an explicit `bf16` is honoured anyway."""
    if not amp:
        return None
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if choice == "auto":
            return torch.bfloat16 if bf16_ok else torch.float16
        if choice == "bf16" and not bf16_ok:
            raise ConfigError(
                f"--amp-dtype bf16: {torch.cuda.get_device_name(device)} lacks bf16; use fp16 or auto"
            )
        return AMP_DTYPES[choice]
    if choice == "fp16":
        raise ConfigError("--amp-dtype fp16 needs a GPU; on a CPU use --amp-dtype bf16 (or auto) or --no-amp")
    if choice == "auto" and not cpu_bf16_is_native():
        return None
    return torch.bfloat16


# ----------------------------------------------------------------------------------- set-up


def _torchrun_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def setup(
    device: str = "auto", amp: bool = False, amp_dtype: str = "auto", timeout_s: float = 300.0
) -> Runtime:
    """Resolve the device and AMP dtype; join the torchrun process group when there is one.

    `timeout_s` bounds the rendezvous and every collective: a rank waiting longer for the others
    fails instead of waiting forever (gloo's own default is 30 minutes)."""
    rank, world, local = _torchrun_env()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        join_process_group(dev, rank, world, timeout_s)
    return Runtime(dev, rank, world, local, resolve_amp_dtype(amp, amp_dtype, dev))


def attempt() -> str:
    """Which start of a torchrun job this is (0, then 1, 2, ... for each --max-restarts restart)."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """A store of this attempt's own under torchrun's agent store, or None (then env:// as usual).

    torchrun's agent keeps one store for every restart of a job, so a restarted process group would
    read the previous attempt's addresses (gloo: "connection refused"; pytorch/pytorch#135712):
    each attempt writes under a prefix of its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"cocoshard/attempt-{attempt()}/", client)


def join_process_group(device: torch.device, rank: int, world: int, timeout_s: float) -> None:
    """NCCL on CUDA, gloo on a CPU; `timeout_s` bounds the rendezvous and every collective. A
    rendezvous that fails (a peer that never came, a store or address never reached) is one line."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    try:
        store = _attempt_store(timeout)
        dist.init_process_group(
            backend=backend,
            device_id=device if device.type == "cuda" else None,
            timeout=timeout,
            store=store,
            rank=rank if store is not None else -1,
            world_size=world if store is not None else -1,
        )
    except (dist.DistError, RuntimeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"rank {rank} of {world}: the processes of this run did not all meet within --dist-timeout "
            f"{timeout_s:g} s ({detail}); check that every node started and can reach "
            f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        ) from None


def cleanup(abandon: bool = False) -> None:
    """Leave the process group (if any) so that torchrun sees a clean exit; `abandon` (a peer was
    lost) leaves it to the process's end instead of asking a broken group to shut down in order."""
    if dist.is_available() and dist.is_initialized() and not abandon:
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, runtime: Runtime) -> nn.Module:
    """DistributedDataParallel around `model` when the run has several processes, else `model`."""
    if not runtime.distributed:
        return model
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (whose state dict has clean names).

    torch.compile returns an `OptimizedModule` that keeps the original as `_orig_mod` (the prefix
    of its state-dict keys). The name is PyTorch's own and has not changed since 2.0; should it
    change, the loop stops at the wrapper and checkpoints carry the prefix, which
    `model.strip_wrapper_prefixes` removes when they are read."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]  # checked to be a Module just above
        else:
            return model


# ----------------------------------------------------------------------------------- collectives


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (no-op in a single process); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0), which may differ in number, in rank order.

    all_gather needs equal shapes, so each rank pads to the longest share and the padding is cut
    off again using the gathered row counts."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable, small: keys, counts), in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable: CPU tensors, numbers) on rank 0, in rank order; None elsewhere."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (a decision taken by one clock, followed by all)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


@torch.no_grad()
def broadcast_state(module: nn.Module) -> None:
    """Rank 0's weights and buffers into `module` on every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------- randomness


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (every device's) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and lists (loadable with weights_only=True)."""
    legacy = np.random.get_state()
    assert isinstance(legacy, tuple)  # (kind, keys, pos, has_gauss, cached), the default form
    kind, keys, pos, has_gauss, cached = legacy
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only when as many devices are visible)."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
