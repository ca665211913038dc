"""Attention with a jvp rule, the DiT backbone and its configs, EMA."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from meanflow import config
from meanflow.models import DIT_CONFIGS, build_model
from meanflow.models import dit as dit_module
from meanflow.models.attention import JVPAttention, attention, math_attention
from meanflow.models.dit import DiT
from meanflow.training.step import EMA


def qkv(dtype, seed=0, shape=(2, 3, 17, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(6)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_attention_outputs_and_tangents_equal_math_attention(dtype, tol):
    q, k, v, dq, dk, dv = qkv(dtype)
    o, do = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    o_ref, do_ref = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(o, o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(do, do_ref, atol=tol, rtol=tol)
    with fwAD.dual_level():  # the forward_ad API reaches the same rule
        out = attention(*(fwAD.make_dual(a, b) for a, b in zip((q, k, v), (dq, dk, dv))))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, do_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(attention(q, k, v), o_ref, atol=tol, rtol=tol)  # no tangent: fused path


def test_fused_sdpa_itself_has_no_forward_ad():
    q, k, v, dq, dk, dv = qkv(torch.float32)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (dq, dk, dv))


def test_attention_gradients_with_and_without_tangent():
    small = qkv(torch.float64, shape=(1, 2, 5, 4))[:3]
    assert torch.autograd.gradcheck(JVPAttention.apply, tuple(a.requires_grad_() for a in small),
                                    check_forward_ad=True)
    q, k, v, dq, dk, dv = qkv(torch.float64)
    grads = []
    for fn in (attention, math_attention):
        prim = [a.clone().requires_grad_() for a in (q, k, v)]
        o, _ = torch.func.jvp(fn, tuple(prim), (dq, dk, dv))  # gradients through the jvp's primal
        grads.append(torch.autograd.grad((o * dv).sum(), prim))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def small_dit(**kw):
    torch.manual_seed(0)
    net = DiT(input_size=8, patch=2, in_channels=3, hidden=48, depth=2, heads=4, num_classes=5, **kw).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_dit_jvp_with_custom_attention_equals_math_attention(monkeypatch):
    net = small_dit()
    g = torch.Generator().manual_seed(1)
    z, dz = torch.randn(2, 2, 3, 8, 8, generator=g, dtype=torch.float64)
    t, r, y = torch.tensor([0.7, 0.4], dtype=torch.float64), torch.tensor([0.2, 0.4], dtype=torch.float64), torch.tensor([1, 5])
    f = lambda z_, r_, t_: net(z_, t_, t_ - r_, y)
    tangents = (dz, torch.zeros_like(r), torch.ones_like(t))
    u, du = torch.func.jvp(f, (z, r, t), tangents)
    monkeypatch.setattr(dit_module, "attention", math_attention)
    u_ref, du_ref = torch.func.jvp(f, (z, r, t), tangents)
    torch.testing.assert_close(u, u_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(du, du_ref, atol=1e-12, rtol=1e-12)
    assert u.shape == z.shape and du.abs().max() > 1e-3


@pytest.mark.parametrize("name,millions", [("MF-B/4", 131), ("MF-B/2", 131), ("MF-M/2", 308),
                                           ("MF-L/2", 459), ("MF-XL/2", 676)])
def test_parameter_counts_match_table_2(name, millions):
    cfg = config.build({"model": {"name": name}})  # ImageNet defaults: 4x32x32 latents, 1000 classes
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(cfg).parameters())
    assert abs(n / 1e6 - millions) / millions < 0.01, n


def test_time_conditioning_variants():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    h = torch.tensor([0.1, 0.3, 0.0], dtype=torch.float64)
    t1, t2 = torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64), torch.tensor([0.9, 0.8, 0.75], dtype=torch.float64)
    counts = {}
    for tc in ("t,r", "t,t-r", "t,r,t-r", "t-r"):
        net = small_dit(time_cond=tc)
        counts[tc] = len(net.t_embedder.embedders)
        same_h = torch.allclose(net(z, t1, h, y), net(z, t2, h, y))
        assert same_h == (tc == "t-r"), tc  # only "t-r" ignores t at fixed t - r
    assert counts == {"t,r": 2, "t,t-r": 2, "t,r,t-r": 3, "t-r": 1}
    with pytest.raises(ValueError, match="time_cond"):
        DiT(input_size=8, patch=2, in_channels=3, hidden=48, depth=1, heads=4, time_cond="r")


def test_custom_dit_needs_its_sizes():
    cfg = config.build({"model": {"name": "custom", "depth": 2, "hidden": 32}})
    with pytest.raises(ValueError, match=r"model\.heads, model\.patch"):
        build_model(cfg)


def test_null_class_and_zero_init():
    net = DiT(input_size=8, patch=2, in_channels=3, hidden=48, depth=2, heads=4, num_classes=5)
    assert net.y_embedder.table.num_embeddings == 6  # index 5 is the null class
    z = torch.randn(2, 3, 8, 8)
    out = net(z, torch.rand(2), torch.rand(2), torch.tensor([5, 0]))
    assert torch.equal(out, torch.zeros_like(z))  # adaLN-Zero: the untrained network outputs 0


def test_ema_update():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    before = ema.net.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.net.weight, 0.9 * before + 0.1 * net.weight)
    assert not any(p.requires_grad for p in ema.net.parameters())
