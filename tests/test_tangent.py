"""The DiT's explicit tangent forward (models/tangent.py) against torch.func.jvp through the plain
module: outputs, tangents, and a MeanFlow training step's loss and gradients."""
import pytest
import torch

from meanflow import config
from meanflow.models.dit import DiT
from meanflow.models.embed import TIME_CONDS
from meanflow.models.mlp import MLP
from meanflow.models.tangent import dit_jvp, supports
from meanflow.objective import MeanFlow

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # relative, in the norm over the whole tensor
SIZES = {  # (input_size, patch, in_channels, hidden, depth, heads, mlp_ratio)
    "small": (8, 2, 3, 32, 2, 2, 4.0),
    "wide": (8, 4, 2, 48, 3, 3, 2.0),
}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_dit(size="small", time_cond="t,t-r", num_classes=5, dtype=torch.float64, seed=0, perturb=0.1):
    s, p, c, hidden, depth, heads, mlp = SIZES[size]
    torch.manual_seed(seed)
    net = DiT(input_size=s, patch=p, in_channels=c, hidden=hidden, depth=depth, heads=heads, mlp_ratio=mlp,
              num_classes=num_classes, time_cond=time_cond).to(dtype)
    # adaLN-Zero starts at u = 0; perturb so that every path matters. At 0.2 the fp32 tangent is
    # ill-conditioned: torch.func.jvp itself is then 2e-5 off its fp64 value, at 0.1 3e-7
    with torch.no_grad():
        for q in net.parameters():
            q.add_(perturb * torch.randn_like(q))
    return net


def inputs(net, n=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    s, c = net.x_embedder.img_size[0], net.in_channels
    z, dz = (torch.randn(n, c, s, s, generator=g, dtype=dtype) for _ in range(2))
    t = torch.rand(n, generator=g, dtype=dtype) * 0.8 + 0.15
    h = t * torch.rand(n, generator=g, dtype=dtype)
    dt, dh = torch.rand(n, generator=g, dtype=dtype) + 0.5, torch.rand(n, generator=g, dtype=dtype)
    y = None
    if net.num_classes > 0:  # every class index, the null class (num_classes) included
        y = torch.arange(n) % (net.num_classes + 1)
    return (z, t, h), (dz, dt, dh), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes", [5, 0])
@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("time_cond", TIME_CONDS)
def test_explicit_tangent_equals_func_jvp(time_cond, size, num_classes, dtype):
    net = make_dit(size, time_cond, num_classes, dtype)
    assert supports(net)
    primals, tangents, y = inputs(net, dtype=dtype)
    u_ref, du_ref = torch.func.jvp(lambda z, t, h: net(z, t, h, y), primals, tangents)
    assert du_ref.norm() > 0.1 * u_ref.norm() > 0
    with torch.no_grad():  # strategy split: primal and tangent share each matmul
        u, du = dit_jvp(net, primals, tangents, y)
    assert rel(u, u_ref) < TOL[dtype] and rel(du, du_ref) < TOL[dtype]
    # the time tangent alone (dz = 0) exercises the embedders' rules
    t_only = (torch.zeros_like(tangents[0]),) + tangents[1:]
    _, du_t_ref = torch.func.jvp(lambda z, t, h: net(z, t, h, y), primals, t_only)
    with torch.no_grad():
        _, du_t = dit_jvp(net, primals, t_only, y)
    assert du_t_ref.norm() > 0 and rel(du_t, du_t_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explicit_tangent_under_grad_mode_carries_the_primal_gradient_only(dtype):
    """Strategy joint: the primal records a graph (gradients equal the plain forward's), the
    tangent none."""
    net = make_dit("wide", "t,r,t-r", 5, dtype)
    primals, tangents, y = inputs(net, dtype=dtype)
    u, du = dit_jvp(net, primals, tangents, y)
    assert u.requires_grad and not du.requires_grad
    w = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    grads = torch.autograd.grad((u * w).sum(), list(net.parameters()), allow_unused=True)
    ref = torch.autograd.grad((net(*primals, y) * w).sum(), list(net.parameters()), allow_unused=True)
    flat = lambda gs: torch.cat([g.flatten() for g in gs if g is not None])
    assert [g is None for g in grads] == [g is None for g in ref]
    assert rel(flat(grads), flat(ref)) < TOL[dtype]
    _, du_ref = torch.func.jvp(lambda z, t, h: net(z, t, h, y), primals, tangents)
    assert rel(du, du_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [slice(2, 5), torch.tensor([0, 3, 4])])
def test_tangent_of_some_rows_inside_the_gradient_forward(rows, dtype):
    """dit_jvp(jvp_rows=...): u over every row with the plain forward's graph, du for the given rows only
    (a slice: the front layout's last rows; indices: the random layout), equal to torch.func.jvp on them."""
    net = make_dit("wide", "t,r,t-r", 5, dtype)
    (z, t, h), (dz, dt, dh), y = inputs(net, dtype=dtype)
    idx = torch.arange(len(z))[rows]
    u, du = dit_jvp(net, (z, t, h), (dz[idx], dt[idx], dh[idx]), y, jvp_rows=rows)
    assert u.requires_grad and not du.requires_grad and len(du) == len(idx) < len(u)
    _, du_ref = torch.func.jvp(lambda a, b, c: net(a, b, c, y[idx]), (z[idx], t[idx], h[idx]), (dz[idx], dt[idx], dh[idx]))
    assert rel(du, du_ref) < TOL[dtype]
    w = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    grads = torch.autograd.grad((u * w).sum(), list(net.parameters()))
    ref = torch.autograd.grad((net(z, t, h, y) * w).sum(), list(net.parameters()))
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    assert rel(flat(grads), flat(ref)) < TOL[dtype]


def mf_cfg(**kw):
    return config.build({"meanflow": kw}).meanflow


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["front", "random"])
@pytest.mark.parametrize("strategy", ["split", "joint"])
def test_training_step_loss_and_gradients_equal_the_generic_jvp(strategy, layout, dtype):
    n, nc = 8, 5
    g = torch.Generator().manual_seed(4)
    x, e = (torch.randn(n, 3, 8, 8, generator=g, dtype=dtype) for _ in range(2))
    y = torch.randint(0, nc, (n,), generator=g)
    t = torch.rand(n, generator=g, dtype=dtype) * 0.8 + 0.15
    fm = torch.arange(n) < 3 if layout == "front" else torch.tensor([0, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    r = torch.where(fm, t, t * torch.rand(n, generator=g, dtype=dtype))  # 3 rows r = t
    drop = torch.arange(n) % 4 == 0  # null-class rows, r = t and r != t both
    out = {}
    for api in ("func", "explicit"):
        net = make_dit("small", "t,t-r", nc, dtype)
        mf = MeanFlow(mf_cfg(strategy=strategy, jvp_api=api, omega=1.5, kappa=0.3), nc)
        res = mf(net, x, y, e=e, t=t, r=r, drop=drop)
        res.loss.backward()
        out[api] = res, torch.cat([q.grad.flatten() for q in net.parameters()])
    (ref, g_ref), (res, g_exp) = out["func"], out["explicit"]
    assert g_ref.abs().sum() > 0
    for a, b in [(res.loss, ref.loss), (res.loss_unweighted, ref.loss_unweighted), (g_exp, g_ref)]:
        assert rel(a.detach(), b.detach()) < TOL[dtype]


@pytest.mark.slow
def test_compiled_tangent_pass_equals_eager():
    """train.compile: MeanFlow.compile_tangent runs the one pass through torch.compile; loss and
    gradients equal the eager pass within fp32 rounding."""
    n, nc = 8, 5
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, 3, 8, 8, generator=g)
    kw = dict(e=torch.randn(n, 3, 8, 8, generator=g), t=torch.rand(n, generator=g) * 0.8 + 0.15,
              drop=torch.zeros(n, dtype=torch.bool))
    kw["r"] = torch.where(torch.arange(n) < 6, kw["t"], kw["t"] / 2)
    y = torch.randint(0, nc, (n,), generator=g)
    out = []
    for compiled in (False, True):
        net = make_dit("small", "t,t-r", nc, torch.float32)
        mf = MeanFlow(mf_cfg(jvp_api="explicit"), nc)
        if compiled:
            mf.compile_tangent()
        res = mf(net, x, y, **kw)
        res.loss.backward()
        out.append((res.loss.detach(), torch.cat([q.grad.flatten() for q in net.parameters()])))
    (l0, g0), (l1, g1) = out
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] > 0  # dynamo captured the pass (no silent eager fallback)
    assert g0.abs().sum() > 0 and rel(l1, l0) < TOL[torch.float32] and rel(g1, g0) < TOL[torch.float32]


def test_objective_runs_the_explicit_rules(monkeypatch):
    """jvp_api explicit reaches dit_jvp (a spy counts the calls), forward_ad does not."""
    from meanflow.models import tangent
    calls = []
    monkeypatch.setattr(tangent, "dit_jvp", lambda *a, **k: calls.append(1) or dit_jvp(*a, **k))
    net = make_dit(dtype=torch.float32)
    x = torch.randn(4, 3, 8, 8)
    for api, expect in (("forward_ad", 0), ("explicit", 1)):
        MeanFlow(mf_cfg(jvp_api=api, ratio=1.0), 5)(net, x, torch.zeros(4, dtype=torch.long),
                                                    generator=torch.Generator().manual_seed(0))
        assert len(calls) == expect


def test_other_backbones_fall_back_to_forward_ad_with_a_warning():
    class Sub(DiT):  # a subclass may change forward: not covered
        pass

    assert not supports(Sub(input_size=8, patch=2, in_channels=3, hidden=32, depth=1, heads=2, num_classes=0))
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=2, num_classes=3).double()
    g = torch.Generator().manual_seed(5)
    x, e = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    y, t = torch.randint(0, 3, (6,), generator=g), torch.rand(6, generator=g) + 0.1
    kw = dict(e=e, t=t.double(), r=(t / 2).double(), drop=torch.zeros(6, dtype=torch.bool))
    ref = MeanFlow(mf_cfg(jvp_api="forward_ad"), 3)(net, x.double(), y, **kw).loss
    with pytest.warns(UserWarning, match="explicit.*MLP uses forward_ad"):
        got = MeanFlow(mf_cfg(jvp_api="explicit"), 3)(net, x.double(), y, **kw).loss
    assert got.item() == ref.item()
