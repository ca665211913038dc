"""Where and how tensors are computed, chosen in one place: the device (from a config key and
what is present, the torchrun LOCAL_RANK GPU under torchrun) and its free memory, the training
precision (train.precision: autocast and TF32 flags), and the seeds: every random draw comes from
a generator seeded by `seed_of` over explicit parts (run seed, purpose, step, index), never from a
stream carried across steps or processes."""
from __future__ import annotations

import hashlib
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch

log = logging.getLogger(__name__)
PRECISIONS = ("bf16", "tf32", "fp32")   # train.precision


def device(name: str | None = "auto", key: str = "device", error: type[Exception] = RuntimeError) -> torch.device:
    """auto (or None): CUDA when present, else CPU; 'cuda' without a GPU raises `error` naming `key`.
    A CUDA device without an index is torchrun's LOCAL_RANK GPU, made the current device."""
    name = name or "auto"
    cuda = torch.cuda.is_available()
    if name.startswith("cuda") and not cuda:
        raise error(f"{key} = {name}, but no CUDA device is present")
    dev = torch.device("cuda" if name == "auto" and cuda else "cpu" if name == "auto" else name)
    if dev.type == "cuda" and dev.index is None:
        from .launch import torchrun_env
        dev = torch.device("cuda", torchrun_env(error).local_rank)
        torch.cuda.set_device(dev)
    return dev


def device_memory(dev) -> int:
    """Bytes a training run on `dev` can still use (train.accum = auto sizes its micro-batches to
    them, meanflow.costs.pick_accum): CUDA, the device's free memory plus what torch's caching
    allocator holds unused; CPU, /proc/meminfo's MemAvailable (else the free physical pages), or
    less when the process's cgroup (v2) has a memory limit, e.g. SLURM's --mem."""
    dev = torch.device(dev)
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    try:   # cgroup v2 ("0::<path>"), else v1's memory controller ("N:memory:<path>")
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
        for ctl, root, files in (("", "/sys/fs/cgroup", ("memory.max", "memory.current")),
                                 ("memory", "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes"))):
            path = next((p for _, c, p in lines if c == ctl), None)
            if path is not None and os.path.exists(f"{root}{path}/{files[0]}"):
                limit, used = (Path(f"{root}{path}/{name}").read_text().strip() for name in files)
                if limit != "max" and int(limit) < 2**60:   # v1's "no limit" is a huge number
                    avail = min(avail, int(limit) - int(used))
                break
    except (OSError, ValueError):
        pass
    return avail


def precision_plan(dev: torch.device, precision: str = "bf16") -> tuple[torch.dtype | None, bool | None]:
    """(autocast dtype or None, TF32 on / off or None = left as torch has them) of train.precision
    on `dev`. bf16 autocast (fp16 diverges in long MeanFlow runs) leaves the flags as they were
    before train.precision existed; the CPU always computes plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision = {precision!r}: one of {', '.join(PRECISIONS)}")
    if dev.type != "cuda":
        return None, None
    return (torch.bfloat16, None) if precision == "bf16" else (None, precision == "tf32")


def precision_used(dev: torch.device, precision: str = "bf16") -> str:
    """The precision a run on `dev` computes in (recorded in the train manifest): fp32 on CPU."""
    return precision if dev.type == "cuda" else "fp32"


def use_precision(dev: torch.device, precision: str = "bf16") -> str:
    """Set train.precision's process-global TF32 flags (matmuls and cuDNN convolutions) where a
    training run starts; nothing is restored (a train stage is its own process). The precision used."""
    _, tf32 = precision_plan(dev, precision)
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    used = precision_used(dev, precision)
    if used != precision:
        log.info("train.precision = %s applies on CUDA only: training on %s in fp32", precision, dev.type)
    return used


def autocast(dev: torch.device, precision: str = "bf16"):
    """The autocast context of train.precision on `dev` (bf16 on CUDA; none for tf32, fp32 and on CPU)."""
    dtype, _ = precision_plan(dev, precision)
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else nullcontext()


def autocast_to(dev_type: str, dtype=None):
    """Autocast to `dtype` on any device (the CPU's bf16 included: the memory model, the rehearsal),
    or explicitly off when None, so an outer autocast does not leak in."""
    return torch.autocast(dev_type, dtype) if dtype else torch.autocast(dev_type, enabled=False)


def seed_of(*parts) -> int:
    """A 63-bit seed from explicit parts, e.g. (run seed, "objective", step) or (sample seed,
    "sample", i): a hash, so nearby parts give unrelated streams."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(dev, *parts) -> torch.Generator:
    """A generator on `dev` seeded with seed_of(*parts)."""
    return torch.Generator(dev).manual_seed(seed_of(*parts))
