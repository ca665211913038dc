"""The MeanFlow objective against independent references: finite differences, a closed-form
average velocity, hand-computed CFG, and a hand-written loss."""
import pytest
import torch

from meanflow import config
from meanflow.models.dit import DiT
from meanflow.objective import TANGENTS, MeanFlow
from meanflow.sampling import sample, schedule

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mf_cfg(**kw):
    return config.build({"meanflow": kw}).meanflow


def tiny_dit(num_classes=3, seed=0, time_cond="t,t-r"):
    torch.manual_seed(seed)
    net = DiT(input_size=4, patch=2, in_channels=2, hidden=32, depth=2, heads=2, num_classes=num_classes,
              time_cond=time_cond).double()
    with torch.no_grad():  # adaLN-Zero starts at u = 0; perturb so that every path matters
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def batch(n=6, seed=1, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g)
    e = torch.randn(n, 2, 4, 4, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    t = torch.rand(n, generator=g) * 0.8 + 0.15
    r = t * torch.rand(n, generator=g)
    return x, e, y, t, r


# ---------------------------------------------------------------------------- jvp target
@pytest.mark.parametrize("tangent", sorted(TANGENTS))
@pytest.mark.parametrize("strategy,api", [("joint", "func"), ("split", "func"), ("joint", "forward_ad")])
def test_target_matches_central_differences(tangent, strategy, api):
    net, (x, e, y, t, r) = tiny_dit(), batch()
    mf = MeanFlow(mf_cfg(tangent=tangent, strategy=strategy, jvp_api=api), num_classes=3)
    z, v = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e, e - x
    u, u_tgt = mf.u_and_target(net, z, t, r, v, y)

    dr, dt = TANGENTS[tangent]
    eps = 1e-6
    with torch.no_grad():
        f = lambda s: net(z + s * v, t + s * dt, (t + s * dt) - (r + s * dr), y)
        dudt = (f(eps) - f(-eps)) / (2 * eps)
        expect = v - (t - r).clamp(0, 1).view(-1, 1, 1, 1) * dudt
        u_ref = net(z, t, t - r, y)
    torch.testing.assert_close(u, u_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(u_tgt, expect, atol=1e-6, rtol=1e-6)


def test_tangents_give_different_targets():
    net, (x, e, y, t, r) = tiny_dit(), batch()
    z, v = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e, e - x
    targets = {k: MeanFlow(mf_cfg(tangent=k), 3).u_and_target(net, z, t, r, v, y)[1] for k in TANGENTS}
    for a in TANGENTS:
        for b in TANGENTS:
            if a < b:
                assert (targets[a] - targets[b]).abs().max() > 1e-4, (a, b)


# ---------------------------------------------------------------------------- closed form
MU, S = 0.7, 0.5  # data x ~ N(MU, S^2) per coordinate


def _m(t):
    return (1 - t) * MU


def _sigma(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def analytic_u(z, t, h, y=None):
    """Exact average velocity of the Gaussian path: trajectories are z_s = m_s + sigma_s xi."""
    r = t - h
    tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    xi = (z - _m(tb)) / _sigma(tb)
    dsig = (2 * (tb - 1) * S**2 + 2 * tb) / (2 * _sigma(tb))  # d sigma / dt, the limit h -> 0
    safe = torch.where(h.view(-1, 1, 1, 1) > 0, tb - rb, torch.ones_like(tb))
    u_avg = (_m(tb) - _m(rb) + (_sigma(tb) - _sigma(rb)) * xi) / safe
    return torch.where(h.view(-1, 1, 1, 1) > 0, u_avg, -MU + dsig * xi)


def test_identity_with_closed_form_average_velocity():
    g = torch.Generator().manual_seed(3)
    n = 8
    t = torch.rand(n, generator=g) * 0.9 + 0.05
    r = t * torch.rand(n, generator=g)
    z = torch.randn(n, 2, 4, 4, generator=g)
    v = analytic_u(z, t, torch.zeros_like(t))  # the marginal velocity field v(z, t) = u(z, t, t)
    u, u_tgt = MeanFlow(mf_cfg(tangent="v01"), 0).u_and_target(analytic_u, z, t, r, v, None)
    torch.testing.assert_close(u_tgt, u, atol=1e-10, rtol=1e-10)
    # the wrong tangents break the identity (so this test can fail)
    _, wrong = MeanFlow(mf_cfg(tangent="v00"), 0).u_and_target(analytic_u, z, t, r, v, None)
    assert (wrong - u).abs().max() > 1e-2


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_sampling_with_exact_u_transports_noise_to_data(nfe):
    e = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    x = sample(analytic_u, e, nfe=nfe)
    torch.testing.assert_close(x, MU + S * e, atol=1e-10, rtol=0)  # xi = e at t = 1


def test_schedules():
    assert schedule(1) == [1.0, 0.0]
    assert schedule(2) == [1.0, 0.5, 0.0]
    assert schedule(times=[1, 0.3, 0]) == [1.0, 0.3, 0.0]
    for bad in ([1.0, 0.5], [0.9, 0.0], [1.0, 0.2, 0.4, 0.0]):
        with pytest.raises(ValueError, match="sample.schedule"):
            schedule(times=bad)
    with pytest.raises(ValueError, match="sample.nfe"):
        schedule(0)


# ---------------------------------------------------------------------------- guidance
def _v_parts(net, x, e, y, t):
    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * e
    with torch.no_grad():
        vu = net(z, t, torch.zeros_like(t), torch.full_like(y, 3))
        vc = net(z, t, torch.zeros_like(t), y)
    return z, e - x, vu, vc


@pytest.mark.parametrize("omega,kappa", [(2.0, 0.0), (1.0, 0.5), (0.2, 0.92), (3.0, 0.4)])
def test_cfg_inside_interval(omega, kappa):
    net, (x, e, y, t, _) = tiny_dit(), batch()
    mf = MeanFlow(mf_cfg(omega=omega, kappa=kappa), num_classes=3)
    none = torch.zeros(len(t), dtype=torch.bool)
    z, v_g_z, v_g, y_in = mf.velocities(net, x, y, e, t, none)
    _, v, vu, vc = _v_parts(net, x, e, y, t)
    if kappa == 0:
        expect = vu + omega * (v - vu)
    else:
        expect = omega * v + (1 - omega - kappa) * vu + kappa * vc
    torch.testing.assert_close(v_g, expect, atol=1e-12, rtol=0)
    assert torch.equal(y_in, y)
    assert (v_g - v).abs().max() > 1e-3


def test_cfg_outside_interval_and_dropped_rows_use_plain_v():
    net, (x, e, y, t, _) = tiny_dit(), batch(n=8)
    t = torch.tensor([0.1, 0.2, 0.5, 0.6, 0.9, 0.95, 0.55, 0.15])
    mf = MeanFlow(mf_cfg(omega=2.0, kappa=0.5, t_start=0.3, t_end=0.8), num_classes=3)
    drop = torch.tensor([False, False, False, True, False, False, False, True])
    _, _, v_g, y_in = mf.velocities(net, x, y, e, t, drop)
    _, v, vu, vc = _v_parts(net, x, e, y, t)
    inside = (t >= 0.3) & (t <= 0.8)
    guided = 2.0 * v + (1 - 2.0 - 0.5) * vu + 0.5 * vc
    expect = torch.where((inside & ~drop).view(-1, 1, 1, 1), guided, v)
    torch.testing.assert_close(v_g, expect, atol=1e-12, rtol=0)
    assert torch.equal(y_in, torch.where(drop, torch.full_like(y, 3), y))


# ---------------------------------------------------------------------------- the whole loss
@pytest.mark.parametrize("p,strategy", [(0.0, "joint"), (0.5, "split"), (1.0, "joint"), (1.0, "split")])
def test_loss_against_hand_computation(p, strategy):
    net, (x, e, y, t, r) = tiny_dit(), batch()
    r[:2] = t[:2]  # some Flow Matching rows
    drop = torch.tensor([True, False, False, False, True, False])
    mf = MeanFlow(mf_cfg(p=p, eps=0.01, omega=1.5, strategy=strategy), num_classes=3)
    out = mf(net, x, y, e=e, t=t, r=r, drop=drop)

    z, v, vu, _ = _v_parts(net, x, e, y, t)
    v_g = torch.where(drop.view(-1, 1, 1, 1), v, vu + 1.5 * (v - vu))
    y_in = torch.where(drop, torch.full_like(y, 3), y)
    eps = 1e-6
    with torch.no_grad():
        f = lambda s: net(z + s * v_g, t + s, t + s - r, y_in)
        tgt = v_g - (t - r).view(-1, 1, 1, 1) * (f(eps) - f(-eps)) / (2 * eps)
        u = net(z, t, t - r, y_in)
        per = ((u - tgt) ** 2).sum((1, 2, 3))
        ref = (per / (per + 0.01) ** p).mean()
        v_loss = ((u - v) ** 2).sum((1, 2, 3)).mean()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss_unweighted, per.mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.mse, ((u - tgt) ** 2).mean(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(out.v_loss, v_loss, atol=1e-10, rtol=1e-10)
    if p == 1.0:
        assert 0.5 < out.loss.item() < 1.0  # weighted loss sits near 1 when p = 1


def test_strategies_and_jvp_apis_give_the_same_loss_and_gradients():
    x, e, y, t, r = batch()
    r[:2] = t[:2]
    drop = torch.zeros(len(t), dtype=torch.bool)
    results = []
    for strategy in ("joint", "split"):
        for api in ("func", "forward_ad"):
            net = tiny_dit()
            out = MeanFlow(mf_cfg(strategy=strategy, jvp_api=api), 3)(net, x, y, e=e, t=t, r=r, drop=drop)
            out.loss.backward()
            results.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(grad, results[0][1], atol=1e-10, rtol=1e-8)
    assert results[0][1].abs().sum() > 0


def test_flow_matching_is_ratio_zero():
    net, (x, e, y, t, _) = tiny_dit(), batch()
    mf = MeanFlow(mf_cfg(ratio=0.0), 3)
    t_s, r_s = mf.sample_t_r(64, torch.Generator().manual_seed(0))
    assert torch.equal(t_s, r_s)
    drop = torch.zeros(len(t), dtype=torch.bool)
    out = mf(net, x, y, e=e, t=t, r=t, drop=drop)
    with torch.no_grad():
        z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
        per = ((net(z, t, torch.zeros_like(t), y) - (e - x)) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(out.loss_unweighted, per.mean())


# ---------------------------------------------------------------------------- t, r and masks
def test_time_sampler_and_ratio_front_layout():
    mf = MeanFlow(mf_cfg(ratio=0.25, mean=-0.4, std=1.0), num_classes=10)
    g = torch.Generator().manual_seed(0)
    t, r = mf.sample_t_r(256, g)
    assert (t >= r).all() and ((t > 0) & (t < 1)).all()
    ne = t != r
    assert ne.sum() == 64 and not ne[:192].any()  # official: the r = t rows lead the batch
    # the two draws are logit-normal(-0.4, 1): logit(max) and logit(min) straddle -0.4
    a = torch.logit(mf._times(200000, torch.Generator().manual_seed(1), None))
    assert abs(a.mean() + 0.4) < 0.01 and abs(a.std() - 1.0) < 0.01
    drop = mf.sample_drop(4096, torch.Generator().manual_seed(2))
    k = int(drop.sum())
    assert abs(k / 4096 - 0.1) < 0.02 and drop[:k].all()  # dropped rows lead too, so they have r = t


def test_random_layout_and_uniform_sampler():
    mf = MeanFlow(mf_cfg(ratio=0.5, sampler="uniform", mask_layout="random", class_drop=0.2), num_classes=10)
    t, r = mf.sample_t_r(100000, torch.Generator().manual_seed(0))
    ne = t != r
    assert abs(ne.float().mean() - 0.5) < 0.01
    assert abs(ne[:50000].float().mean() - ne[50000:].float().mean()) < 0.02  # not front-loaded
    assert abs(t.mean() - 2 / 3) < 0.01 and abs(r[ne].mean() - 1 / 3) < 0.01  # max/min of two uniforms
    drop = mf.sample_drop(100000, torch.Generator().manual_seed(1))
    assert abs(drop.float().mean() - 0.2) < 0.01 and not drop[:100].all()


def test_draws_follow_the_generator():
    net, (x, _, y, _, _) = tiny_dit(), batch()
    mf = MeanFlow(mf_cfg(), 3)
    a = mf(net, x, y, generator=torch.Generator().manual_seed(5)).loss
    b = mf(net, x, y, generator=torch.Generator().manual_seed(5)).loss
    c = mf(net, x, y, generator=torch.Generator().manual_seed(6)).loss
    assert a.item() == b.item() and a.item() != c.item()
