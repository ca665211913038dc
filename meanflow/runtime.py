"""Where and how tensors are computed, chosen in one place: the device (from a config key and
what is present, the torchrun LOCAL_RANK GPU under torchrun), the autocast precision, and the
seeds: every random draw comes from a generator seeded by `seed_of` over explicit parts
(run seed, purpose, step, index), never from a stream carried across steps or processes."""
from __future__ import annotations

import hashlib
from contextlib import nullcontext

import torch


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


def autocast(dev: torch.device):
    """bf16 autocast on GPU (fp16 diverges in long MeanFlow runs); full fp32 on CPU."""
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def seed_of(*parts) -> int:
    """A 63-bit seed from explicit parts, e.g. (run seed, "objective", step) or (sample seed,
    "sample", i): a hash, so nearby parts give unrelated streams."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(dev, *parts) -> torch.Generator:
    """A generator on `dev` seeded with seed_of(*parts)."""
    return torch.Generator(dev).manual_seed(seed_of(*parts))
