"""EDM's augmentation pipe as py-meanflow configures it for CIFAR-10 (paper App. A: "EDM augmentation
with vertical flip and rotation disabled"), returning the augmentation labels the U-Net is
conditioned on.

py-meanflow: AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1, translate_frac=1).
Per image, in EDM's order (labels in that order, AUGMENT_DIM = 6):
- x-flip: probability min(1, 1e8 p) = 1 of a fair coin, so a plain random flip whose bit is a label;
- isotropic scale 2^(0.2 w), w ~ N(0, 1), with probability p;
- anisotropic scale 2^(+-0.2 w) about an axis at angle r (r = 0 half the time), with probability p;
  labels w cos r, w sin r;
- translation by (0.125 W, 0.125 H) * w, w ~ N(0, I_2), with probability p (EDM's translate_frac:
  fractional, resampled; labels w).
The geometric part runs as EDM's does: reflect padding, 2x upsampling with the sym6 wavelet, one
bilinear grid_sample of the whole batch, sym6 downsampling. p = 0 returns the images unchanged and
zero labels. Every draw comes from the `generator` given, so a step's augmentation is a function of
its seed (resume stays bitwise identical).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENT_DIM = 6
XFLIP, SCALE_STD, ANISO_STD, ANISO_ROTATE_PROB, TRANSLATE_STD = 1e8, 0.2, 0.2, 0.5, 0.125
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]


def _mat(rows, n, device, dtype):
    """Stack per-image 3x3 matrices; entries are scalars or (n,) tensors."""
    out = torch.zeros(n, 3, 3, device=device, dtype=dtype)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            out[:, i, j] = v
    return out


def _scale(sx, sy, n, dev, dt):
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n, dev, dt)


def _rotate(a, n, dev, dt):
    return _mat([[a.cos(), -a.sin(), 0], [a.sin(), a.cos(), 0], [0, 0, 1]], n, dev, dt)


def _translate(tx, ty, n, dev, dt):
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n, dev, dt)


def augment(images: torch.Tensor, p: float, generator: torch.Generator | None = None):
    """(augmented images, labels N x AUGMENT_DIM) for images N x C x H x W."""
    N, C, H, W = images.shape
    dev, dt = images.device, torch.float32
    if p == 0:
        return images, torch.zeros(N, AUGMENT_DIM, device=dev, dtype=dt)
    rand = lambda *s: torch.rand(*s, generator=generator, device=dev)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=generator, device=dev)  # noqa: E731
    labels = []

    w = torch.randint(2, (N,), generator=generator, device=dev)
    w = torch.where(rand(N) < XFLIP * p, w, torch.zeros_like(w))
    images = torch.where(w.view(N, 1, 1, 1) == 1, images.flip(3), images)
    labels.append(w.to(dt))

    g_inv = torch.eye(3, device=dev, dtype=dt).expand(N, 3, 3)
    w = randn(N)
    w = torch.where(rand(N) < p, w, torch.zeros_like(w))
    s = (w * SCALE_STD).exp2()
    g_inv = g_inv @ _scale(1 / s, 1 / s, N, dev, dt)
    labels.append(w)

    w, r = randn(N), (rand(N) * 2 - 1) * math.pi
    w = torch.where(rand(N) < p, w, torch.zeros_like(w))
    r = torch.where(rand(N) < ANISO_ROTATE_PROB, r, torch.zeros_like(r))
    s = (w * ANISO_STD).exp2()
    g_inv = g_inv @ _rotate(-r, N, dev, dt) @ _scale(1 / s, s, N, dev, dt) @ _rotate(r, N, dev, dt)
    labels += [w * r.cos(), w * r.sin()]

    w = randn(2, N)
    w = torch.where(rand(1, N) < p, w, torch.zeros_like(w))
    g_inv = g_inv @ _translate(-w[0] * W * TRANSLATE_STD, -w[1] * H * TRANSLATE_STD, N, dev, dt)
    labels += [w[0], w[1]]

    images = _warp(images, g_inv)
    return images, torch.stack(labels, dim=1)


def _warp(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """EDM's execution of a batch of inverse pixel-space transforms (anti-aliased via sym6)."""
    N, C, H, W = images.shape
    dev, dt = images.device, g_inv.dtype
    hz = torch.tensor(SYM6, dtype=images.dtype, device=dev)
    hz_pad = len(SYM6) // 4
    cx, cy = (W - 1) / 2, (H - 1) / 2
    cp = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=dev, dtype=dt)
    cp = g_inv @ cp.t()                                    # corners: N x 3 x 4
    margin = cp[:, :2, :].permute(1, 0, 2).flatten(1)      # xy x (N * 4)
    margin = torch.cat([-margin, margin]).max(dim=1).values
    margin = margin + torch.tensor([hz_pad * 2 - cx, hz_pad * 2 - cy] * 2, device=dev, dtype=dt)
    margin = margin.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, device=dev, dtype=dt))
    mx0, my0, mx1, my1 = (int(v) for v in margin.ceil().tolist())
    images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
    g_inv = _translate((mx0 - mx1) / 2, (my0 - my1) / 2, N, dev, dt) @ g_inv

    # upsample 2x (zero stuffing, then sym6 along each axis)
    k = hz.flip(0)[None, None].expand(C, 1, -1)
    pad = (len(SYM6) + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
    images = F.conv2d(images, k.unsqueeze(2), groups=C, padding=[0, pad])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
    images = F.conv2d(images, k.unsqueeze(3), groups=C, padding=[pad, 0])
    g_inv = _scale(2, 2, N, dev, dt) @ g_inv @ _scale(0.5, 0.5, N, dev, dt)
    g_inv = _translate(-0.5, -0.5, N, dev, dt) @ g_inv @ _translate(0.5, 0.5, N, dev, dt)

    shape = [N, C, (H + hz_pad * 2) * 2, (W + hz_pad * 2) * 2]
    g_inv = (_scale(2 / images.shape[3], 2 / images.shape[2], N, dev, dt) @ g_inv
             @ _scale(shape[3] / 2, shape[2] / 2, N, dev, dt))
    grid = F.affine_grid(g_inv[:, :2, :].to(images.dtype), shape, align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # downsample 2x and crop
    k = hz[None, None].expand(C, 1, -1)
    pad = (len(SYM6) - 1) // 2
    images = F.conv2d(images, k.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, hz_pad:-hz_pad]
    images = F.conv2d(images, k.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, hz_pad:-hz_pad, :]
    return images

