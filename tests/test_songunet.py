"""The CIFAR-10 U-Net (EDM's DDPM++ SongUNet as py-meanflow builds it): parameter count against an
independent count of EDM's layer shapes, where attention sits, the FIR filter, the output conv's
near-zero init, the concatenated time input, augmentation labels, and jvp vs finite differences."""
import math

import pytest
import torch

from meanflow.config import load
from meanflow.data.augment import AUGMENT_DIM
from meanflow.models import build_model
from meanflow.models.songunet import Block, SongUNet

TINY = dict(input_size=8, in_channels=1, channels=16, channel_mult=(1, 2), layers_per_block=1, attn_resolutions=(4,))


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return SongUNet(**{**TINY, **kw}).double().eval()


def inputs(B=3, C=1, S=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, S, S, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    return z, t, t * torch.rand(B, generator=g, dtype=torch.float64)  # z, t, h = t - r with r in [0, t]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def edm_count(res=32, cin=3, ch=128, mult=(2, 2, 2), blocks=4, attn=(16,), noise_mult=2, times=2, aug=6):
    """Parameters of py-meanflow's SongUNet config, from EDM's layer definitions (networks.py):
    UNetBlock = norm0, conv0 3x3, affine, norm1, conv1 3x3, [skip 1x1], [norm2, qkv 1x1, proj 1x1]."""
    emb, noise = 4 * ch, noise_mult * ch * times

    def block(i, o, a=False, resample=False):
        n = 2 * i + (9 * i * o + o) + (emb * o + o) + 2 * o + (9 * o * o + o)
        n += (i * o + o) if (i != o or resample) else 0
        return n + ((2 * o + 3 * o * o + 3 * o + o * o + o) if a else 0)

    total = aug * noise + (noise * emb + emb) + (emb * emb + emb)        # map_augment (no bias), map_layer0/1
    total += 9 * cin * ch + ch                                            # enc conv
    skips, c = [ch], ch
    for lvl, m in enumerate(mult):
        if lvl:
            total += block(c, c, resample=True)
            skips.append(c)
        for _ in range(blocks):
            total += block(c, ch * m, a=(res >> lvl) in attn)
            c = ch * m
            skips.append(c)
    for lvl in reversed(range(len(mult))):
        total += block(c, c, a=True) + block(c, c) if lvl == len(mult) - 1 else block(c, c, resample=True)
        for i in range(blocks + 1):
            total += block(c + skips.pop(), ch * mult[lvl], a=(i == blocks and (res >> lvl) in attn))
            c = ch * mult[lvl]
    return total + 2 * c + 9 * c * cin + cin                             # aux_norm, aux_conv


def test_cifar10_config_matches_the_official_count():
    cfg = load(tier="cifar10")
    with torch.device("meta"):
        net = build_model(cfg)
    assert isinstance(net, SongUNet) and cfg.data.augment == 0.12
    official = edm_count()
    assert n_params(net) == official == 55_932_419
    # EDM's own DDPM++ (noise embedding 128 wide, one time, 9 augment labels) is the 55.73M of its paper
    assert edm_count(noise_mult=1, times=1, aug=9) == 55_733_891
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    attn = [b for b in blocks if b.attn]
    # encoder: 4 blocks at 16x16; bottleneck: 1; decoder: the last block of the 16x16 level only
    assert len(attn) == 6 and all(b.norm2.num_channels == 256 for b in attn)
    assert net.map_layer0.in_features == 2 * 256  # concat of the 256-wide sinusoids of t and h


def test_fir_resampling_and_near_zero_output_init():
    net = SongUNet(**TINY)
    down = [b for b in net.enc if isinstance(b, Block) and isinstance(b.conv0, torch.nn.Sequential)]
    assert len(down) == 1
    f = down[0].conv0[0].f[0, 0]
    torch.testing.assert_close(f, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    # a constant image stays constant under the FIR down/upsampling (away from the zero-padded border)
    x = torch.ones(1, 4, 8, 8)
    assert torch.allclose(down[0].conv0[0](x)[..., 1:-1, 1:-1], torch.ones(1, 4, 2, 2))
    w = net.out_conv.weight
    bound = 1e-5 * math.sqrt(6 / (w.shape[0] * 9 + w.shape[1] * 9))  # xavier-uniform at gain 1e-5
    assert 0 < w.abs().max() <= bound and net.out_conv.bias.abs().max() == 0
    z, t, h = inputs(C=1)
    assert net.double()(z, t, h).abs().max() < 1e-3  # the untrained net outputs ~0


def trained_like(net):
    """Weights moved away from the near-zero init, so every branch contributes to the output."""
    g = torch.Generator().manual_seed(2)
    for p in net.parameters():
        p.data.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return net


def test_time_input_and_augment_labels():
    net = trained_like(tiny(augment_dim=AUGMENT_DIM))
    z, t, h = inputs()
    out = net(z, t, h)
    assert out.shape == z.shape
    assert not torch.allclose(net(z, t, h * 0.5), out)  # h enters
    # sampling passes no labels; zero labels are the same thing (the map is bias-free)
    torch.testing.assert_close(net(z, t, h, aug=torch.zeros(3, AUGMENT_DIM, dtype=torch.float64)), out, rtol=0, atol=0)
    assert not torch.allclose(net(z, t, h, aug=torch.ones(3, AUGMENT_DIM, dtype=torch.float64)), out)
    with pytest.raises(ValueError, match="attn_resolutions"):
        SongUNet(**{**TINY, "attn_resolutions": (3,)})


def test_jvp_matches_finite_differences():
    net = trained_like(tiny(num_classes=10))
    z, t, h = inputs()
    y = torch.tensor([0, 3, 10])
    r = t - h
    v = torch.randn_like(z)
    u = lambda z, r, t: net(z, t, t - r, y)  # noqa: E731  MeanFlow's u(z, r, t); tangents (v, 0, 1)
    out, dudt = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    torch.testing.assert_close(out, u(z, r, t))
    eps = 1e-5
    fd = (u(z + eps * v, r, t + eps) - u(z - eps * v, r, t - eps)) / (2 * eps)
    assert (fd - dudt).abs().max() < 1e-6 * dudt.abs().max()
    # and with gradients through the jvp (the joint strategy): finite everywhere
    out, tan = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    (out.square().sum() + tan.square().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
