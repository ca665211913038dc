"""The CIFAR-10 U-Net (diffusers UNet2DModel): size, interface, jvp, attention processor, conditioning."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from meanflow.config import load
from meanflow.models import build_model
from meanflow.models.embed import TIME_CONDS
from meanflow.models.unet import JVPAttnProcessor, UNet

TINY = dict(input_size=8, in_channels=1, channels=32, channel_mult=(1, 2), layers_per_block=1, attn_resolutions=(4,))


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet(**{**TINY, **kw}).double().eval()


def inputs(B=3, C=1, S=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, S, S, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    return z, t, t * torch.rand(B, generator=g, dtype=torch.float64)  # z, t, h = t - r with r in [0, t]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_cifar10_config_is_55m():
    cfg = load(tier="cifar10")
    with torch.device("meta"):
        net = build_model(cfg)
    assert isinstance(net, UNet)
    assert abs(n_params(net) / 55e6 - 1) < 0.05, n_params(net)
    widths = net.unet.config.block_out_channels
    assert tuple(widths) == (256, 256, 256) and net.unet.config.layers_per_block == 4
    attn = [type(b).__name__ for b in net.unet.down_blocks]
    assert attn == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]  # attention at 16x16 only (plus the bottleneck)


def test_forward_shape_and_interface():
    net = tiny()
    z, t, h = inputs()
    assert net(z, t, h).shape == z.shape
    with torch.device("meta"):
        big = UNet()  # the cifar10 shape: 3x32x32
        assert big(torch.empty(2, 3, 32, 32), torch.empty(2), torch.empty(2)).shape == (2, 3, 32, 32)


def test_jvp_matches_finite_differences():
    net = tiny()
    z, t, h = inputs()
    r = t - h
    v = torch.randn_like(z)
    u = lambda z, r, t: net(z, t, t - r)  # noqa: E731  MeanFlow's u(z, r, t); tangents (v, 0, 1)
    out, dudt = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    torch.testing.assert_close(out, u(z, r, t))
    eps = 1e-3  # the sinusoid is computed in float32 (embed.py): FD in t is good to ~1e-5 relative
    fd = (u(z + eps * v, r, t + eps) - u(z - eps * v, r, t - eps)) / (2 * eps)
    assert (fd - dudt).abs().max() < 1e-4 * dudt.abs().max()
    # along z alone everything is float64: much tighter
    _, dz = torch.func.jvp(lambda z: u(z, r, t), (z,), (v,))
    eps = 1e-5
    fd = (u(z + eps * v, r, t) - u(z - eps * v, r, t)) / (2 * eps)
    assert (fd - dz).abs().max() < 1e-7 * dz.abs().max()


def test_gradient_through_jvp():
    # the "joint" strategy: gradients flow through both the primal and the tangent (JVPAttention.backward)
    net = tiny()
    z, t, h = inputs()
    v = torch.randn_like(z)
    out, tan = torch.func.jvp(lambda z, t, h: net(z, t, h), (z, t, h), (v, torch.ones_like(t), torch.ones_like(h)))
    (out.square().sum() + tan.square().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
    net.zero_grad()
    net(z, t, h).square().sum().backward()  # the primal's gradient is the plain forward's
    g_plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    out, _ = torch.func.jvp(lambda z, t, h: net(z, t, h), (z, t, h), (v, torch.ones_like(t), torch.ones_like(h)))
    out.square().sum().backward()
    for a, p in zip(g_plain, net.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_processor_matches_diffusers_default():
    net = tiny()
    z, t, h = inputs()
    attns = [m for m in net.modules() if isinstance(m, Attention)]
    assert len(attns) == 4 and all(isinstance(m.processor, JVPAttnProcessor) for m in attns)  # down 1, mid 1, up 1 + 1
    ours = net(z, t, h)
    # diffusers' default (fused SDPA) to float64 precision; its math path upcasts the softmax to float32
    for proc, tol in ((AttnProcessor2_0, 1e-12), (AttnProcessor, 1e-6)):
        for m in attns:
            m.set_processor(proc())
        torch.testing.assert_close(net(z, t, h), ours, rtol=tol, atol=tol)
    # and module by module on a feature map
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    for m in attns:
        m.set_processor(AttnProcessor2_0())
        ref = m(x)
        m.set_processor(JVPAttnProcessor())
        torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("time_cond", TIME_CONDS)
def test_time_cond_structure(time_cond):
    base, net = tiny(time_cond="t-r"), tiny(time_cond=time_cond)
    names = time_cond.split(",")
    emb = net.unet.time_proj
    assert emb.names == names and len(emb.embedders) == len(names)
    per_time = n_params(emb.embedders[0])
    assert n_params(net) - n_params(base) == (len(names) - 1) * per_time
    # the output depends on exactly the times embedded: move t with h fixed, or h with t fixed
    z, t, h = inputs()
    moved_t, moved_h = net(z, t + 0.1, h), net(z, t, h + 0.1)
    out = net(z, t, h)
    assert (not torch.allclose(out, moved_t)) == (time_cond != "t-r")
    assert not torch.allclose(out, moved_h)  # every variant sees h through r or t-r


def test_t_scale_multiplies_times():
    a, b = tiny(t_scale=1.0), tiny(t_scale=1000.0)
    z, t, h = inputs()
    torch.testing.assert_close(b(z, t, h), a(z, 1000 * t, 1000 * h))


def test_unconditional_ignores_labels_and_conditional_uses_them():
    net = tiny()
    z, t, h = inputs()
    assert net.unet.class_embedding is None
    y = torch.tensor([0, 3, 7])
    torch.testing.assert_close(net(z, t, h, y), net(z, t, h))
    cond = tiny(num_classes=10)
    assert cond.unet.class_embedding.num_embeddings == 11  # null class = index 10
    assert not torch.allclose(cond(z, t, h, y), cond(z, t, h, torch.full_like(y, 10)))


def test_bad_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.attn_resolutions"):
        UNet(**{**TINY, "attn_resolutions": (16,)})
    with pytest.raises(ValueError, match="data.input_size"):
        UNet(**{**TINY, "input_size": 6, "channel_mult": (1, 2, 2)})
