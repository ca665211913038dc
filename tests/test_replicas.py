"""Stacked replicas (meanflow/training/stacked.py, models.tangent.StackedDiT): the stacked pass equals each
DiT's own forward, jvp and gradients; replica i trained stacked equals seed i trained alone (float
tolerance); a stacked run stopped and resumed is bitwise the uninterrupted one; a grouped row's
Snakemake job writes every replica's outputs."""
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_fakes import digits_store
from meanflow import config, layout, plan
from meanflow.training.stacked import why_not_stacked
from meanflow.training.checkpoint import checkpoints
from meanflow.training.loop import Loop, Preempted, train
from meanflow.models.dit import DiT
from meanflow.models.tangent import StackedDiT, dit_jvp

STEPS = 24


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def dits(R, dtype=torch.float64, time_cond="t,r,t-r"):
    nets = []
    for i in range(R):
        torch.manual_seed(i)
        net = DiT(input_size=8, patch=4, in_channels=1, hidden=32, depth=2, heads=4, num_classes=10,
                  time_cond=time_cond).to(dtype)
        with torch.no_grad():  # adaLN-Zero starts at u = 0: perturb so that every path matters
            for q in net.parameters():
                q.add_(0.1 * torch.randn_like(q))
        nets.append(net)
    return nets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_pass_equals_each_dit(dtype):
    R, n, tol = 3, 5, {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    nets = dits(R, dtype)
    S = StackedDiT.stack(nets)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(R * n, 1, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(R * n, generator=g, dtype=dtype)
    h = t * torch.rand(R * n, generator=g, dtype=dtype)
    y = torch.randint(0, 11, (R * n,), generator=g)
    part = lambda i: slice(i * n, (i + 1) * n)
    ref = torch.cat([nets[i](z[part(i)], t[part(i)], h[part(i)], y[part(i)]) for i in range(R)])
    assert rel(S(z, t, h, y), ref) < tol
    pos = torch.tensor([1, 3, 4])  # the tangent rows: the same positions in every replica
    rows = (torch.arange(R)[:, None] * n + pos).flatten()
    dz, dh = torch.randn(len(rows), 1, 8, 8, generator=g, dtype=dtype), torch.rand(len(rows), generator=g, dtype=dtype)
    dt = torch.ones(len(rows), dtype=dtype)
    u, du = dit_jvp(S, (z, t, h), (dz, dt, dh), y, jvp_rows=rows)
    m = len(pos)
    du_ref = torch.cat([torch.func.jvp(lambda a, b, c: nets[i](a, b, c, y[rows[i * m:(i + 1) * m]]),
                                       tuple(x[rows[i * m:(i + 1) * m]] for x in (z, t, h)),
                                       tuple(x[i * m:(i + 1) * m] for x in (dz, dt, dh)))[1] for i in range(R)])
    assert du_ref.norm() > 0 and rel(du, du_ref) < tol and rel(u, ref) < tol
    w = torch.randn(u.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad((u * w).sum(), list(S.parameters()))
    for i in range(R):  # replica i's gradient is its own net's, nothing of the others
        own = torch.autograd.grad((nets[i](z[part(i)], t[part(i)], h[part(i)], y[part(i)]) * w[part(i)]).sum(),
                                  list(nets[i].parameters()))
        flat = lambda gs: torch.cat([x.flatten() for x in gs])
        assert rel(flat(x[i] for x in grads), flat(own)) < tol
        assert all(torch.equal(S.replica(i)[k], v) for k, v in nets[i].state_dict().items())
    with pytest.raises(ValueError, match="same positions"):
        dit_jvp(S, (z, t, h), (dz[:4], dt[:4], dh[:4]), y, jvp_rows=torch.tensor([0, 1, n, n + 2]))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return digits_store(tmp_path_factory.mktemp("replica_data"), flip=False)


def params(path: Path, data_root: Path, runs: Path, **meanflow) -> Path:
    tier = {"data": {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8, "num_classes": 10,
                     "vae": None, "flip": False, "root": str(data_root), "device": "cpu"},
            "model": {"name": "custom", "depth": 2, "hidden": 32, "heads": 2, "patch": 4},
            "meanflow": {"jvp_api": "explicit", **meanflow},
            "train": {"steps": STEPS, "batch": 16, "lr": 0.002, "ema": 0.9, "ckpt_every": 8, "keep_ckpts": 5,
                      "log_every": 4, "device": "cpu", "runs_root": str(runs), "replicates": 3, "group_replicas": True}}
    path.write_text(yaml.safe_dump({"tier": "t", "tiers": {"t": tier}}))
    return path


def replica_cfgs(p: Path):
    full = config.load(p)
    return [plan.replica(full, i) for i in range(plan.replicates(full))]


@pytest.mark.parametrize("guided", [False, True])
def test_replica_trained_stacked_equals_its_seed_trained_alone(data_root, tmp_path, guided):
    """Seeds 0, 1, 2 trained stacked vs each alone: same EMA weights within float rounding after
    STEPS steps (the batched matmuls sum in another order), same logged losses; CFG (omega, kappa)
    in training calls the stacked net without the rows' concatenation."""
    mf = {"omega": 1.5, "kappa": 0.3} if guided else {}
    stacked = replica_cfgs(params(tmp_path / "a.yaml", data_root, tmp_path / "a", **mf))
    alone = replica_cfgs(params(tmp_path / "b.yaml", data_root, tmp_path / "b", **mf))
    assert why_not_stacked(stacked[0]) is None
    calls = []
    orig = Loop.advance
    Loop.advance = lambda self, *a: calls.append(self.R) or orig(self, *a)
    try:
        train(*stacked, progress=False)
    finally:
        Loop.advance = orig
    assert calls == [3] * STEPS  # trained stacked, not one by one
    for c in alone:
        train(c, progress=False)
    for a, b in zip(stacked, alone):
        assert a.run_id == b.run_id
        ea, eb = (load_file(layout.run(c).ema) for c in (a, b))
        flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])
        assert flat(eb).norm() > 0 and rel(flat(ea), flat(eb)) < 1e-4, a.run_id
    # replicas differ: they are different seeds
    e0, e1 = (load_file(layout.run(c).ema) for c in stacked[:2])
    assert rel(torch.cat([e0[k].flatten() for k in sorted(e0)]), torch.cat([e1[k].flatten() for k in sorted(e1)])) > 1e-2


def test_stacked_run_stopped_then_resumed_is_bitwise_the_uninterrupted_one(data_root, tmp_path, monkeypatch):
    ref = replica_cfgs(params(tmp_path / "r.yaml", data_root, tmp_path / "r"))
    train(*ref, progress=False)
    cut = replica_cfgs(params(tmp_path / "c.yaml", data_root, tmp_path / "c"))
    orig = Loop.advance

    def stop_at_10(self, stop_requested=False, signum=None):
        return orig(self, stop_requested or self.k == 9, signum)   # a SIGTERM during step 10
    monkeypatch.setattr(Loop, "advance", stop_at_10)
    with pytest.raises(Preempted):
        train(*cut, progress=False)
    assert all(checkpoints(layout.run(c).root)[-1][0] == 10 for c in cut)
    assert not any(layout.run(c).ema.exists() for c in cut)
    monkeypatch.setattr(Loop, "advance", orig)
    train(*cut, progress=False)
    for a, b in zip(ref, cut):
        ra, rb = layout.run(a).root, layout.run(b).root
        assert (ra / "ema.safetensors").read_bytes() == (rb / "ema.safetensors").read_bytes()
        (sa, ca), (sb, cb) = checkpoints(ra)[-1], checkpoints(rb)[-1]
        assert sa == sb == STEPS and (ca / "model.safetensors").read_bytes() == (cb / "model.safetensors").read_bytes()
        oa = torch.load(ca / "state.pt", weights_only=True)["optimizer"]["state"]
        ob = torch.load(cb / "state.pt", weights_only=True)["optimizer"]["state"]
        assert oa.keys() == ob.keys() and all(torch.equal(oa[k][x], ob[k][x]) for k in oa for x in oa[k])


def test_rows_that_cannot_stack_train_one_by_one(data_root, tmp_path):
    cfgs = replica_cfgs(params(tmp_path / "f.yaml", data_root, tmp_path / "f", jvp_api="forward_ad"))
    assert "explicit" in why_not_stacked(cfgs[0])
    train(*cfgs[:2], progress=False)
    assert all(layout.run(c).ema.exists() for c in cfgs[:2])
    shutil.rmtree(tmp_path / "f")
