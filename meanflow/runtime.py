"""Where and how tensors are computed, chosen in one place: the device (from a config key and
what is present, the torchrun LOCAL_RANK GPU under torchrun), the training precision
(train.precision: autocast and TF32 flags), and the seeds: every random draw comes from a
generator seeded by `seed_of` over explicit parts (run seed, purpose, step, index), never from a
stream carried across steps or processes."""
from __future__ import annotations

import hashlib
import logging
from contextlib import nullcontext

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


def seed_of(*parts) -> int:
    """A 63-bit seed from explicit parts, e.g. (run seed, "objective", step) or (sample seed,
    "sample", i): a hash, so nearby parts give unrelated streams."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(dev, *parts) -> torch.Generator:
    """A generator on `dev` seeded with seed_of(*parts)."""
    return torch.Generator(dev).manual_seed(seed_of(*parts))
