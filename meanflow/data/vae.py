"""The latent tiers' VAE: diffusers' AutoencoderKL from a hub id (pinned revision) or a local
directory, loaded from safetensors only, and the encoding the store keeps: posterior mean and
std of each image and of its horizontal flip, encoded separately."""
from __future__ import annotations

from pathlib import Path

import torch

from ..manifest import file_hash
from .fetch import DataError

WEIGHTS = "diffusion_pytorch_model.safetensors"
# stabilityai/sd-vae-ft-mse's architecture (its config.json): 4 blocks of 2 layers, 8x down, 4 latent channels
SD_VAE = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
          "norm_num_groups": 32, "sample_size": 256}


def resolve(name: str, revision: str | None = None) -> Path:
    """A local directory holding config.json and the safetensors weights."""
    p = Path(name).expanduser()
    if p.is_dir():
        local = p
    elif p.is_absolute() or name.startswith(".") or name.count("/") != 1:
        raise DataError(f"data.vae = {name!r}: not a directory, nor a hub id like stabilityai/sd-vae-ft-mse")
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
        try:
            local = Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=["config.json", WEIGHTS]))
        except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            raise DataError(f"data.vae = {name!r} (revision {revision}): cannot fetch it ({type(e).__name__}: {e}); "
                            "offline, give a local diffusers directory") from None
    for f in ("config.json", WEIGHTS):
        if not (local / f).is_file():
            raise DataError(f"{local / f}: missing (data.vae = {name!r} needs a diffusers AutoencoderKL in safetensors)")
    return local


def load(name: str, revision: str | None = None, device: str | torch.device = "cpu"):
    """(vae, info) with info = {name, revision, sha256 of weights and config} for manifests."""
    from diffusers import AutoencoderKL
    local = resolve(name, revision)
    vae = AutoencoderKL.from_pretrained(local, use_safetensors=True, torch_dtype=torch.float32,
                                        low_cpu_mem_usage=False)  # the same load without accelerate, and no nag
    # channels_last: oneDNN (CPU) and cuDNN convolutions run faster on NHWC activations
    vae = vae.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    info = {"name": name, "revision": revision, "weights_sha256": file_hash(local / WEIGHTS),
            "config_sha256": file_hash(local / "config.json")}
    return vae, info


@torch.inference_mode()
def encode_pair(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: B x 3 x H x W in [-1, 1]. Returns fp16 (mean, std), each B x 2 x C x h x w, index 1 of
    dim 1 being the posterior of the flipped image. Two forwards of B rather than one of 2B: the
    same work, and on CPU the smaller activations stay in cache."""
    posts = [vae.encode(v.contiguous(memory_format=torch.channels_last)).latent_dist for v in (x, x.flip(-1))]
    return (torch.stack([p.mean for p in posts], 1).half(), torch.stack([p.std for p in posts], 1).half())


def random_vae(path: Path, seed: int = 0, **arch) -> Path:
    """SD_VAE's architecture (with `arch` changes, e.g. narrow block_out_channels) randomly
    initialised and saved with save_pretrained: a stand-in for the real weights, loadable by `load`."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    AutoencoderKL(**{**SD_VAE, **arch}).save_pretrained(path)
    return Path(path)


def latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % f:
        raise DataError(f"data.resolution = {resolution} is not a multiple of the VAE's downsampling factor {f}")
    return vae.config.latent_channels, resolution // f, resolution // f
