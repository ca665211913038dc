"""improved MeanFlow: the iMF loss against an independent computation (finite-difference du/dt,
the boundary condition, the guided target), guidance as the official code computes it (and the
switches to the earlier departures), guidance conditions reach the network on every branch,
sampling at omega = 1 is unguided sampling, the iMF DiT's parameter counts and initialisation
(official formulas; init = dit the earlier network bit for bit), and the train stage
with the iMF objective: rows independent of the world size, 2 gloo processes == 1, resume bitwise."""
from types import SimpleNamespace as NS

import pytest
import torch
import yaml
from safetensors.torch import load_file

from meanflow import config
from meanflow.training import batches
from meanflow.training.checkpoint import checkpoints
from meanflow.training.distributed import Dist
from meanflow.training.loop import Loop, Replica, train
from meanflow.data import Store
from meanflow.objective import IMF, build_objective
from meanflow.models.dit import DiT
from meanflow.models.imf_dit import IMF_CONFIGS, IMF_PARAMS, IMFDiT, inference_params
from meanflow.sampling import sample
from test_train import ROOT, assert_same_run, data_root, train_two_ranks  # noqa: F401 (fixture)

B, K = 8, 10


def mf_cfg(**kw):
    base = dict(ratio=0.5, sampler="lognorm", mean=-0.4, std=1.0, tangent="v01", p=1.0, eps=0.01, omega=2.0,
                kappa=0.0, t_start=0.0, t_end=1.0, class_drop=0.1, mask_layout="front", strategy="split",
                jvp_api="forward_ad", jvp_fp32=True, objective="imf", v_source="head", omega_cond=True,
                interval_cond=True, s_max=7.0, cfg_beta=1.0, null_omega="one", drop_tangent="class")
    return NS(**{**base, **kw})


def tiny_net(**kw):
    torch.manual_seed(0)
    net = IMFDiT(8, 4, 1, 32, 2, 4, num_classes=K, head_depth=1, tokens=(2, 1, 1, 1), **kw).double()
    with torch.no_grad():  # zero-initialised outputs and gates would hide the conditions: perturb every weight
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.8, 0.6, 0.4, 0.95], dtype=torch.float64)
    r = torch.tensor([0.2, 0.7, 0.1, 0.3, 0.5, 0.6, 0.05, 0.0], dtype=torch.float64)   # rows 1, 3, 5: r = t
    drop = torch.tensor([0, 0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    omega = torch.tensor([1.5, 3.0, 2.0, 6.0, 1.0, 4.0, 7.5, 2.5], dtype=torch.float64)
    t_min = torch.tensor([0.1, 0.0, 0.2, 0.0, 0.3, 0.0, 0.45, 0.0], dtype=torch.float64)
    t_max = torch.tensor([0.6, 1.0, 0.9, 1.0, 0.55, 1.0, 0.7, 1.0], dtype=torch.float64)
    return dict(x=x, y=y, e=e, t=t, r=r, drop=drop, omega=omega, t_min=t_min, t_max=t_max)


def reference_loss(net, a, head: bool, null_omega="one", drop_tangent="class", fd=1e-6):
    """The iMF loss written out, du/dt by central finite differences through the network. (row, null):
    the formula of the code before the switches existed (v_u at w, dropped rows' tangent v_u)."""
    x, y, e, t, r, drop = a["x"], a["y"], a["e"], a["t"], a["r"], a["drop"]
    om, lo, hi = a["omega"], a["t_min"], a["t_max"]
    b = lambda s: s.view(-1, 1, 1, 1)
    z, v = (1 - b(t)) * x + b(t) * e, e - x
    w = torch.where((t >= lo) & (t <= hi), om, 1.0)
    null = torch.full_like(y, K)
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    with torch.no_grad():
        out = "v" if head else "u"   # boundary condition: v = u(z, t, t), i.e. h = 0
        v_c = net(z, t, zero, y, omega=w, t_min=zero, t_max=one, out=out)
        v_u = net(z, t, zero, null, omega=w if null_omega == "row" else one, t_min=zero, t_max=one, out=out)
    v_g = torch.where(b(drop), v, v + b(1 - 1 / w) * (v_c - v_u))
    tangent = torch.where(b(drop), v_u, v_c) if drop_tangent == "null" else v_c
    y_in = torch.where(drop, null, y)
    u_at = lambda zz, tt: net(zz, tt, tt - r, y_in, omega=om, t_min=lo, t_max=hi)
    with torch.no_grad():
        dudt = (u_at(z + fd * tangent, t + fd) - u_at(z - fd * tangent, t - fd)) / (2 * fd)
    u, vh = net(z, t, t - r, y_in, omega=om, t_min=lo, t_max=hi, out="uv") if head else (u_at(z, t), None)
    V = u + b(t - r) * dudt
    lu = ((V - v_g) ** 2).flatten(1).sum(1)
    loss = lu / (lu.detach() + 0.01)
    if head:
        lv = ((vh - v_g) ** 2).flatten(1).sum(1)
        loss = loss + lv / (lv.detach() + 0.01)
    return loss.mean(), lu.mean()


@pytest.mark.parametrize("switches", [("one", "class"), ("row", "null")], ids=["official", "earlier"])
@pytest.mark.parametrize("v_source", ["head", "boundary"])
def test_imf_loss_matches_independent_computation(v_source, switches):
    """Official guidance (default) and the earlier departures (null_omega row, drop_tangent null)."""
    head, (null_omega, drop_tangent) = v_source == "head", switches
    net, a = tiny_net(v_head=head), inputs()
    obj = IMF(mf_cfg(v_source=v_source, null_omega=null_omega, drop_tangent=drop_tangent), K)
    out = obj(net, a["x"], a["y"], e=a["e"], t=a["t"], r=a["r"], drop=a["drop"], omega=a["omega"],
              t_min=a["t_min"], t_max=a["t_max"])
    grads = torch.autograd.grad(out.loss, list(net.parameters()), allow_unused=True)
    ref, ref_u = reference_loss(net, a, head, null_omega, drop_tangent)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()), allow_unused=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss_unweighted, ref_u, rtol=1e-6, atol=0)
    assert 10 < float(ref_u) < 1e4
    for g, rg in zip(grads, ref_grads):
        if rg is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-9)
    # the v-head's own loss moves v-head weights; the boundary variant has none
    assert head == any(n.startswith("v_") for n, _ in net.named_parameters())
    assert all(g is not None and g.abs().sum() > 0 for (n, _), g in zip(net.named_parameters(), grads) if n.startswith("v_blocks"))


def test_explicit_jvp_api_falls_back_for_the_imf_dit_and_runs_the_rules_on_a_plain_dit(monkeypatch):
    """meanflow.jvp_api = explicit (params.yaml's default): the iMF DiT is not exactly the DiT, so
    its jvp runs forward_ad with a warning (the same loss bits); an iMF loss on a plain DiT (fixed
    guidance) takes the hand-derived tangent (dz, dt, dh) = (v, 1, 1), equal to forward_ad's."""
    from meanflow.models import tangent
    from meanflow.objective import jvp
    monkeypatch.setattr(jvp, "_WARNED", set())   # warned once per type and process
    net, a = tiny_net(), inputs()
    args = {k: a[k] for k in ("e", "t", "r", "drop", "omega", "t_min", "t_max")}
    ref = IMF(mf_cfg(), K)(net, a["x"], a["y"], **args).loss
    with pytest.warns(UserWarning, match="explicit.*IMFDiT uses forward_ad"):
        got = IMF(mf_cfg(jvp_api="explicit"), K)(net, a["x"], a["y"], **args).loss
    assert got.item() == ref.item()

    torch.manual_seed(0)
    dit = DiT(input_size=8, patch=2, in_channels=1, hidden=32, depth=2, heads=2, num_classes=K).double()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    calls, real = [], tangent.dit_jvp
    monkeypatch.setattr(tangent, "dit_jvp", lambda *q, **k: calls.append(1) or real(*q, **k))
    fixed = dict(omega_cond=False, interval_cond=False, v_source="boundary")
    args = {k: a[k] for k in ("e", "t", "r", "drop")}
    ref = IMF(mf_cfg(**fixed), K)(dit, a["x"], a["y"], **args)
    got = IMF(mf_cfg(jvp_api="explicit", **fixed), K)(dit, a["x"], a["y"], **args)
    assert calls == [1] and 1 < float(ref.loss_unweighted) < 1e4
    torch.testing.assert_close(got.loss_unweighted, ref.loss_unweighted, rtol=1e-10, atol=0)


def test_guidance_term_matters():
    """Same explicit inputs, omega = 1 everywhere: the target is then v (no guidance), so the loss differs."""
    net, a = tiny_net(), inputs()
    obj = IMF(mf_cfg(), K)
    args = {k: a[k] for k in ("e", "t", "r", "drop", "t_min", "t_max")}
    g = obj(net, a["x"], a["y"], omega=a["omega"], **args).loss_unweighted
    u = obj(net, a["x"], a["y"], omega=torch.ones_like(a["omega"]), **args).loss_unweighted
    assert abs(float(g) - float(u)) > 1e-5 * float(u)   # the guidance term is small next to v: ~3e-4 here


@pytest.mark.parametrize("cond", ["in_context", "adaln"])
def test_conditions_change_the_output_on_every_class(cond):
    net = tiny_net(cond=cond)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.full((4,), 0.7, dtype=torch.float64)
    base = dict(omega=torch.full_like(t, 2.0), t_min=torch.full_like(t, 0.2), t_max=torch.full_like(t, 0.8))
    for y in (torch.tensor([0, 3, 7, 9]), torch.full((4,), K)):   # the null class too
        ref = net(z, t, t * 0.5, y, **base)
        for k, val in (("omega", 5.0), ("t_min", 0.4), ("t_max", 0.6)):
            other = net(z, t, t * 0.5, y, **{**base, k: torch.full_like(t, val)})
            assert (other - ref).abs().max() > 1e-4, (k, y)
        for k, val in (("omega", 5.0), ("t_min", 0.4)):
            other = net(z, t, t * 0.5, y, **{**base, k: torch.full_like(t, val)}, out="v")
            assert (other - net(z, t, t * 0.5, y, **base, out="v")).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no omega"):
        tiny_net(omega_cond=False)(z, t, t, y, omega=base["omega"])


@pytest.mark.parametrize("null_omega", ["one", "row"])
def test_every_network_call_sees_the_conditions(null_omega):
    """The guidance pass (class and null branch), the jvp and the gradient forward all get omega and
    the interval; the class rows get the windowed omega w, the null-class rows omega = 1 (official)
    or, null_omega = row, the same w as their class rows."""
    net, a = tiny_net(), inputs()
    calls = []
    real = net.forward

    def spy(z, t, h, y=None, **kw):
        calls.append((y.clone(), {k: v.detach().clone() for k, v in kw.items() if torch.is_tensor(v)}, kw.get("out", "u")))
        return real(z, t, h, y, **kw)

    net.forward = spy
    IMF(mf_cfg(null_omega=null_omega), K)(net, a["x"], a["y"],
                                          **{k: a[k] for k in ("e", "t", "r", "drop", "omega", "t_min", "t_max")})
    assert [c[2] for c in calls] == ["v", "u", "uv"]   # guidance (2B rows), jvp (r != t rows), gradient forward
    for y, kw, _ in calls:
        assert set(kw) == {"omega", "t_min", "t_max"} and all(len(v) == len(y) for v in kw.values())
    y, kw, _ = calls[0]
    w = torch.where((a["t"] >= a["t_min"]) & (a["t"] <= a["t_max"]), a["omega"], 1.0)
    w_u = w if null_omega == "row" else torch.ones_like(w)
    assert (y[B:] == K).all() and torch.equal(kw["omega"][B:], w_u) and torch.equal(kw["omega"][:B], w)
    assert torch.equal(kw["t_min"], torch.zeros(2 * B, dtype=w.dtype)) and (kw["t_max"] == 1).all()
    assert (w != 1).sum() >= 4 and torch.equal(calls[2][1]["omega"], a["omega"])


def official_guidance(net, z, t, r, v, y, drop, omega, t_min, t_max):
    """The official imf.py, line by line: guidance_fn (v_fn's batch [omega, ones], v_g_fm at the raw
    omega on r = t rows) then cond_drop; the jvp tangent is v_c on every row."""
    zero, one, null = torch.zeros_like(t), torch.ones_like(t), torch.full_like(y, K)
    v_cond = lambda w, yy: net(z, t, zero, yy, omega=w, t_min=zero, t_max=one, out="v")
    b = lambda s: s.view(-1, 1, 1, 1)
    v_c, v_u = v_cond(omega, y), v_cond(one, null)
    v_g_fm = v + b(1 - 1 / omega) * (v_c - v_u)
    w = torch.where((t >= t_min) & (t <= t_max), omega, 1.0)
    v_c = v_cond(w, y)
    v_g = torch.where(b(t == r), v_g_fm, v + b(1 - 1 / w) * (v_c - v_u))
    return torch.where(b(drop), v, v_g), v_c, torch.where(drop, null, y), v_u


@pytest.mark.parametrize("null_omega, drop_tangent", [("one", "class"), ("row", "class"), ("one", "null"),
                                                      ("row", "null")])
def test_guidance_is_the_official_code_by_default_and_the_switches_the_earlier_one(null_omega, drop_tangent):
    net, a = tiny_net(), inputs()
    b = lambda s: s.view(-1, 1, 1, 1)
    t, drop, om = a["t"], a["drop"], a["omega"]
    z, v = (1 - b(t)) * a["x"] + b(t) * a["e"], a["e"] - a["x"]
    obj = IMF(mf_cfg(null_omega=null_omega, drop_tangent=drop_tangent), K)
    v_g, tangent, y_in = obj.guidance(net, z, t, v, a["y"], drop, om, a["t_min"], a["t_max"])
    ref_g, v_c, ref_y, v_u = official_guidance(net, z, t, a["r"], v, a["y"], drop, om, a["t_min"], a["t_max"])
    assert torch.equal(y_in, ref_y) and torch.equal(v_g[drop], v[drop])
    if null_omega == "one":
        torch.testing.assert_close(v_g, ref_g, rtol=1e-12, atol=1e-12)
    else:   # v_u at the row's w: a different target wherever guidance acts (w != 1, label kept)
        w = torch.where((t >= a["t_min"]) & (t <= a["t_max"]), om, 1.0)
        zero = torch.zeros_like(t)
        v_uw = net(z, t, zero, torch.full_like(a["y"], K), omega=w, t_min=zero, t_max=torch.ones_like(t), out="v")
        torch.testing.assert_close(v_g, torch.where(b(drop), v, v + b(1 - 1 / w) * (v_c - v_uw)), rtol=1e-12, atol=1e-12)
        acts = (w != 1) & ~drop
        assert acts.sum() >= 2 and ((v_g - ref_g).flatten(1).abs().amax(1)[acts] > 1e-6).all()
    want = torch.where(b(drop), v_uw if null_omega == "row" else v_u, v_c) if drop_tangent == "null" else v_c
    torch.testing.assert_close(tangent, want, rtol=1e-12, atol=1e-12)
    if drop_tangent == "null":
        assert (tangent[drop] - v_c[drop]).abs().amax() > 1e-6


def test_each_switch_moves_the_loss_and_null_omega_needs_omega_cond():
    """Row 2 of the batch is dropped with r != t, so its tangent enters du/dt; without omega_cond
    omega is no network input and null_omega cannot matter."""
    a = inputs()
    args = {k: a[k] for k in ("e", "t", "r", "drop", "omega", "t_min", "t_max")}
    loss = lambda net, **kw: IMF(mf_cfg(**kw), K)(net, a["x"], a["y"], **args).loss_unweighted.item()
    net = tiny_net()
    base = loss(net)
    for kw in (dict(null_omega="row"), dict(drop_tangent="null")):
        assert abs(loss(net, **kw) - base) > 1e-6 * base, kw
    net = tiny_net(omega_cond=False)
    fixed = dict(omega_cond=False, drop_tangent="null")
    assert loss(net, null_omega="row", **fixed) == loss(net, null_omega="one", **fixed)


def test_omega_law_and_interval_draws():
    obj = IMF(mf_cfg(), K)
    g = torch.Generator().manual_seed(0)
    t, r = obj.sample_t_r(20000, g)
    c = obj.sample_conditions(t, r, g)
    om = c["omega"]
    assert om.min() >= 1 and om.max() <= 8
    # beta = 1: log-uniform on [1, 8], so the median is sqrt(8)
    assert abs(float(om.median()) - 8 ** 0.5) < 0.05
    fm = t == r
    assert abs(float(fm.float().mean()) - 0.5) < 1e-3   # 50% of rows r = t
    assert (c["t_min"][fm] == 0).all() and (c["t_max"][fm] == 1).all()
    assert 0 <= c["t_min"][~fm].min() and c["t_min"][~fm].max() <= 0.5 <= c["t_max"][~fm].min()
    assert abs(float(c["t_max"][~fm].mean()) - 0.75) < 0.01
    fixed = IMF(mf_cfg(omega_cond=False, interval_cond=False, omega=2.5, t_start=0.1, t_end=0.9), K)
    c = fixed.sample_conditions(t[:5], r[:5], g)
    assert c["omega"].tolist() == [2.5] * 5 and torch.allclose(c["t_min"], torch.full((5,), 0.1))


def test_label_drop_is_the_official_front_layout_shared_with_meanflow():
    """The official iMF cond_drop: num_drop = sum(rand < p), then the first num_drop examples, which
    all have r = t (data_proportion 0.5 puts the r = t examples first). The very draw MeanFlow makes."""
    from meanflow.objective import MeanFlow
    obj = IMF(mf_cfg(), K)
    g = torch.Generator().manual_seed(3)
    t, r = obj.sample_t_r(4096, g)
    drop = obj.sample_drop(4096, g)
    k = int(drop.sum())
    assert abs(k / 4096 - 0.1) < 0.02 and drop[:k].all() and not drop[k:].any()
    assert (t[drop] == r[drop]).all()
    g2 = torch.Generator().manual_seed(3)
    obj.sample_t_r(4096, g2)
    assert torch.equal(MeanFlow(mf_cfg(), K).sample_drop(4096, g2), drop)
    rand = IMF(mf_cfg(mask_layout="random"), K).sample_drop(4096, torch.Generator().manual_seed(4))
    assert abs(float(rand.float().mean()) - 0.1) < 0.02 and not rand[:int(rand.sum())].all()


def test_sampling_at_omega_1_is_unguided():
    net = tiny_net().float()
    e = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(6)
    for nfe in (1, 2):
        plain = sample(net, e, y, nfe=nfe)
        assert torch.equal(sample(net, e, y, nfe=nfe, omega=1.0), plain)
        assert torch.equal(sample(net, e, y, nfe=nfe, omega=1.0, t_min=0.0, t_max=1.0), plain)
        assert (sample(net, e, y, nfe=nfe, omega=4.0, t_min=0.3, t_max=0.7) - plain).abs().max() > 1e-4
    dit = DiT(8, 4, 1, 32, 2, 4, num_classes=K)   # no conditions: only the unguided setting is accepted
    assert torch.equal(sample(dit, e, y, omega=1.0, t_min=0.0, t_max=1.0), sample(dit, e, y))
    with pytest.raises(ValueError, match="no omega conditioning"):
        sample(dit, e, y, omega=2.0)


def test_parameter_counts():
    with torch.device("meta"):
        for name, (depth, hidden, heads, patch) in IMF_CONFIGS.items():
            for init in ("official", "dit"):   # dit: + the attention biases, 4 hidden per block
                n = inference_params(IMFDiT(32, patch, 4, hidden, depth, heads, num_classes=1000, init=init)) / 1e6
                if name in IMF_PARAMS:
                    assert abs(n / IMF_PARAMS[name] - 1) < 0.02, (name, init, n)
        # adaLN, no v-head, no conditions, plain blocks, DiT's init (with its biases): exactly MeanFlow's DiT
        kw = dict(time_cond="t,t-r", cond="adaln", omega_cond=False, interval_cond=False, v_head=False, swiglu=False,
                  rmsnorm=False, rope=False, qk_norm=False)
        count = lambda m: sum(p.numel() for p in m.parameters())
        assert count(IMFDiT(32, 2, 4, 768, 12, 12, init="dit", **kw)) == count(DiT(32, 2, 4, 768, 12, 12))
        assert count(IMFDiT(32, 2, 4, 768, 12, 12, **kw)) == count(DiT(32, 2, 4, 768, 12, 12)) - 12 * 4 * 768
        # in-context drops the adaLN modulation: iMF-B/2 89M against MF-B/2's 131M
        assert 130e6 < count(DiT(32, 2, 4, 768, 12, 12)) < 132e6


def _init_classes(net, hidden):
    """name: ("normal", std) | ("xavier", std, bound) | ("zero",) | ("one",) for every parameter, after
    the official code: TorchLinear scaled_variance N(0, (c / sqrt(fan_in))^2), c = 0.32 in blocks, 1 in
    the embedders; class table and tokens N(0, 1 / hidden); PatchEmbedder xavier; zero gates and outputs."""
    out = {}
    for n, p in net.named_parameters():
        if n.endswith("bias") or "adaLN" in n or "final_layer.linear" in n or n.endswith("_scale"):
            out[n] = ("zero",)
        elif "blocks." in n and p.dim() == 2:       # attention (fused qkv: fan_in = hidden per row) and MLP
            out[n] = ("normal", 0.32 / p.shape[1] ** 0.5)
        elif "embedder" in n and ".mlp." in n:      # time (every one of time_cond), omega, t_min, t_max
            out[n] = ("normal", 1 / p.shape[1] ** 0.5)
        elif n == "y_embedder.table.weight" or n.endswith("_tokens"):
            out[n] = ("normal", 1 / hidden ** 0.5)
        elif n == "x_embedder.proj.weight":         # xavier over (kh kw cin -> hidden)
            fan_in, fan_out = p[0].numel(), p.shape[0]
            out[n] = ("xavier", (2 / (fan_in + fan_out)) ** 0.5, (6 / (fan_in + fan_out)) ** 0.5)
        else:
            assert p.dim() == 1 and "norm" in n, n   # RMSNorm / LayerNorm gains
            out[n] = ("one",)
    return out


@pytest.mark.parametrize("variant", ["in_context", "adaln_gelu"])
def test_official_init_matches_the_official_formulas(variant):
    """A wide network (hidden 384, so fan_in 256 / 384 / 1024 / 1536 tell the formulas apart): every
    weight's empirical std within 3% (more for small tensors) of the official formula, means ~0,
    biases zero, no attention bias. adaln_gelu: our extension (the official code has neither)."""
    hidden = 384
    kw = dict(cond="adaln", swiglu=False, rmsnorm=False, rope=False, qk_norm=False, time_cond="t,t-r") \
        if variant == "adaln_gelu" else dict(time_cond="t,t-r", tokens=(16, 16, 16, 16))
    torch.manual_seed(0)
    net = IMFDiT(16, 2, 4, hidden, 2, 6, num_classes=1000, head_depth=1, **kw)
    classes = _init_classes(net, hidden)
    assert not any(".attn." in n and n.endswith("bias") for n in classes)
    fans = {p.shape[1] for n, p in net.named_parameters() if classes[n][0] == "normal" and "blocks." in n}
    assert fans == ({hidden, 4 * hidden} if variant == "adaln_gelu" else {hidden, 1024})
    seen = set()
    for n, p in net.named_parameters():
        kind, *arg = classes[n]
        seen.add(kind)
        if kind in ("zero", "one"):
            assert torch.equal(p, torch.full_like(p, kind == "one")), n
            continue
        tol = max(0.03, 4 / (2 * p.numel()) ** 0.5)
        assert abs(p.std().item() / arg[0] - 1) < tol, (n, p.std().item(), arg[0])
        assert abs(p.mean().item()) < 5 * arg[0] / p.numel() ** 0.5, n
        if kind == "xavier":
            assert p.abs().max() <= arg[1]
    assert seen == {"zero", "normal", "xavier"} | ({"one"} if variant == "in_context" else set())   # adaLN: no affine norms


def test_dit_init_is_the_earlier_network():
    """init = dit: the attention biases return (the only extra keys) and the weights are, bit for bit,
    those of the code before model.init existed: fingerprints computed with that code (commit 51290d5)
    for these seeds, torch's CPU generator. Its formulas: xavier linears, N(0, 0.02) embedders."""
    def fingerprint(net):
        ps = [p.double() for _, p in sorted(net.state_dict().items())]
        return len(ps), sum((i + 1) * p.sum() for i, p in enumerate(ps)).item(), sum(p.square().sum() for p in ps).item()

    torch.manual_seed(0)
    a = IMFDiT(8, 4, 1, 32, 2, 4, num_classes=10, head_depth=1, tokens=(2, 1, 1, 1), init="dit")
    torch.manual_seed(1)
    b = IMFDiT(8, 2, 1, 32, 2, 4, num_classes=10, time_cond="t,t-r", cond="adaln", v_head=False, swiglu=False,
               rmsnorm=False, rope=False, qk_norm=False, init="dit")
    for net, (n, lin, sq) in ((a, (69, 12686.707993352682, 1009.5935423919897)),
                              (b, (47, -105.66280466769058, 390.43605908759605))):
        got = fingerprint(net)
        assert got[0] == n and got[1:] == pytest.approx((lin, sq), rel=1e-6, abs=1e-6), got
    official = set(IMFDiT(8, 4, 1, 32, 2, 4, num_classes=10, head_depth=1, tokens=(2, 1, 1, 1)).state_dict())
    extra = set(a.state_dict()) - official
    assert official < set(a.state_dict()) and extra and all(k.endswith(("attn.qkv.bias", "attn.proj.bias")) for k in extra)
    assert len(extra) == 2 * (len(a.blocks) + len(a.u_blocks) + len(a.v_blocks))
    torch.manual_seed(0)
    w = IMFDiT(16, 2, 4, 384, 2, 6, num_classes=1000, head_depth=1, init="dit")
    assert abs(w.blocks[0].attn.qkv.weight.std().item() / (2 / (384 + 3 * 384)) ** 0.5 - 1) < 0.03
    for p in (w.y_embedder.table.weight, w.t_embedder.embedders[0].mlp[0].weight, w.omega_embedder.mlp[2].weight):
        assert abs(p.std().item() / 0.02 - 1) < 0.03


def test_build_imf_dit_passes_model_init():
    from meanflow.models.imf_dit import build_imf_dit
    model = dict(arch="imf_dit", name="custom", depth=2, hidden=32, heads=2, patch=4, head_depth=1, tokens=[2, 1, 1, 1])
    data = dict(dataset="digits", resolution=8, channels=1, input_size=8, num_classes=10, vae=None)
    mf = dict(objective="imf", v_source="head", omega_cond=True, interval_cond=True)
    for init, has_bias in (("official", False), (None, False), ("dit", True)):
        m = {**model, "init": init} if init else model
        net = build_imf_dit(config.build({"data": data, "model": m, "meanflow": mf}))
        assert ("blocks.0.attn.qkv.bias" in net.state_dict()) == has_bias


# --------------------------------------------------------------------------- the train stage
def write_params(path, data_root, runs_root, **train):
    t = {"steps": 12, "batch": 16, "lr": 0.001, "ema": 0.9, "ckpt_every": 4, "keep_ckpts": 2, "log_every": 4,
         "device": "cpu", "runs_root": str(runs_root), **train}
    tier = {"data": {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8, "num_classes": 10,
                     "vae": None, "flip": True, "root": str(data_root), "device": "cpu"},
            "model": {"arch": "imf_dit", "name": "custom", "depth": 2, "hidden": 32, "heads": 2, "patch": 4,
                      "head_depth": 1, "tokens": [2, 1, 1, 1], "time_cond": "t-r"},
            "meanflow": {"objective": "imf", "v_source": "head", "omega_cond": True, "interval_cond": True, "ratio": 0.5},
            "train": t}
    path.write_text(yaml.safe_dump({"tier": "t", "tiers": {"t": tier}}))
    return path


def test_imf_rows_do_not_depend_on_world_size(data_root):
    cfg = config.load(write_params(data_root / "imf.yaml", data_root, data_root / "runs"))
    store, obj = Store.from_config(cfg), build_objective(cfg.meanflow, 10)
    sampler = batches.EpochSampler(len(store), 0)
    one = batches.load_batch(store, sampler, obj, 3, 24, 0, 1, 0, "cpu")
    two = [batches.load_batch(store, sampler, obj, 3, 24, r, 2, 0, "cpu") for r in range(2)]
    for k in ("omega", "t_min", "t_max"):
        assert torch.equal(torch.cat([p.cond[k] for p in two]), one.cond[k])
    assert (one.t != one.r).sum() == 12 and len(set(one.cond["omega"].tolist())) == 24


def test_imf_resume_is_bitwise_identical(data_root, tmp_path):
    ref = config.load(write_params(tmp_path / "a.yaml", data_root, tmp_path / "a"))
    train(ref, progress=False)
    cfg = config.load(write_params(tmp_path / "b.yaml", data_root, tmp_path / "b"))
    tr = Loop(Replica(cfg, Dist(0, 1, torch.device("cpu"))), progress=False)
    tr.open()
    try:
        while tr.k < 6:   # a checkpoint at 4, then two steps that are lost as in a kill
            tr.advance()
    finally:
        tr.close()
    assert [s for s, _ in checkpoints(cfg.run_dir)] == [4]
    train(cfg, progress=False)
    import test_train
    old, test_train.STEPS = test_train.STEPS, 12
    try:
        assert_same_run(cfg.run_dir, ref.run_dir)
    finally:
        test_train.STEPS = old


def test_imf_two_gloo_processes_equal_one(data_root, tmp_path):
    one = write_params(tmp_path / "one.yaml", data_root, tmp_path / "one", steps=3, batch=24)
    two = write_params(tmp_path / "two.yaml", data_root, tmp_path / "two", steps=3, batch=24)
    train_two_ranks(two, tmp_path)
    cfg = config.load(one)
    train(cfg, progress=False)
    a, b = cfg.run_dir, config.load(two).run_dir
    assert a.name == b.name
    init = Replica(cfg, Dist(0, 1, torch.device("cpu"))).net.state_dict()
    for f in ("model.safetensors", "ema.safetensors"):
        wa, wb = (load_file(d / "checkpoints" / "step-00000003" / f) for d in (a, b))
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=f"{f} {k}")
    assert any(not torch.equal(init[k], wa[k]) for k in wa if k in init)


# --------------------------------------------------------------------------- tables
def test_imf_tables_show_the_published_numbers(tmp_path):
    import csv
    from meanflow import plan, tables
    params = config.load_params()
    rows = plan.rows(params, "tiny", ["imf1"])
    assert [r.row for r in rows] == ["mf", "v_boundary", "v_head", "omega_cond", "interval_cond", "in_context",
                                     "improved_block", "longer"]
    assert len({r.run_id for r in rows}) == 8 and "imf1" not in plan.Plan(params, "tiny").tables  # not in make run
    tables.build(params, "tiny", tmp_path, ["imf1"])
    with open(ROOT / "reference" / "imf_results.csv") as f:
        published = {r["row"]: r["fid"] for r in csv.DictReader(f) if r["table"] == "imf1"}
    with open(tmp_path / "tiny" / "tables" / "table_imf1.csv") as f:
        ours = {r["row"]: r["paper FID"] for r in csv.DictReader(f)}
    assert ours == published and ours["improved_block"] == "3.82"
    assert (tmp_path / "tiny" / "plots_imf1" / "fid_vs_nfe.png").exists()
    assert (tmp_path / "tiny" / "tables" / "manifest_imf1.json").exists()
    imagenet = {(r.table, r.row) for r in plan.rows(params, "imagenet")}
    assert {("imf2", "iMF-XL/2-2nfe"), ("imf1", "longer")} <= imagenet
