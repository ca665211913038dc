"""Data parallelism through every jvp path at MF-B/4's real width: one training step (training.step)
of the imagenet tier's default MeanFlow objective (ratio 0.25, class_drop 0.1 with omega 1 and
kappa 0, mask_layout front, strategy split) on MF-B/4 (131M parameters, 4x32x32 latents, 1000
classes + null), for meanflow.jvp_api explicit, forward_ad and func, on 2 gloo processes (each rank
its contiguous share of the global batch's draws, batches.load_batch) equals the same step in 1
process on the whole batch: the averaged gradients, the updated weights, the EMA, the loss metrics.
Two ways to average: the project's GradAverager (what the trainer does), and the net wrapped in
torch DistributedDataParallel as the objective's grad_net (the gradient-carrying forward through
DDP, the jvp through the bare module: with DDP the explicit path takes the split route, a tangent
pass without a graph and then the DDP forward, instead of its one pass).

Users of other MeanFlow reproductions report the jvp through a DDP-wrapped model failing. Its root,
tested here too: torch.func.jvp through the DDP wrapper itself raises in torch 2.14.1, as DDP's
forward copies rank 0's buffers into the module (strict xfail, FUNC_THROUGH_DDP); forward_ad
through the wrapper, and func with forward_sync_buffers=False, give the bare module's du/dt.

One torchrun launch runs this file as the worker on both ranks; the model is built once per
process and reloaded from its initial state between runs (each process peaks at 5-6 GiB: the
model, its gradients, Adam's state, the EMA, DDP's buckets, the initial weights and the 1-process
step's weights and gradients to compare with). Rank 0 also runs the 1-process step on
the whole batch; rank 1 meanwhile the step on its half alone, the control (a trainer that does not
average): against the 2-process step it is far off. The tests read the numbers the ranks wrote.

The weights are DiT's init with the adaLN-Zero layers (every block's and the final layer's
modulation, the final linear) drawn N(0, 0.02) instead of zero: at the bare init u = 0 and
du/dt = 0 for every input, so the jvp would contribute nothing and only the final linear layer
would get a gradient."""
import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
APIS = ("explicit", "forward_ad", "func")
# the global batch: ratio 0.25 with the front layout gives rows 6 and 7 of 8 r != t, and
# batches._spread deals one to each rank (a global batch of 4 has one such row, on rank 1 only)
BATCH = 8
STORE = 1024   # examples in the stand-in latent store
# Tolerances, 2 processes (GradAverager or DDP) against 1; measured on torch 2.14.1, CPU, 1 thread per
# process, the same for every jvp path within a factor 1.3 (the tests print them):
# gradients, per parameter tensor max |G - G_1| / max |G_1|: float summation order (each rank's
#   half-batch mean, then the all-reduce); measured <= 9.4e-7, norm-wise <= 7.1e-8
TOL_GRAD = 1e-5
# weights: Adam's first step is lr * g / (|g| + eps), (lr / eps)-Lipschitz in g, so per tensor
#   max |W - W_1| <= (lr / eps) max |G - G_1| + 2 ulp of max |W_1| (each side rounds W0 + step once);
#   measured <= 0.27 of that bound. Where |g| << eps (1e-8) the step is about lr * g / eps, so
#   rounding-level gradient differences show: measured up to 1.3% of the step's max |change| (in
#   x_embedder.proj.weight, at |g| ~ 2e-10); norm-wise ||W - W_1|| / ||W_1 - W0|| measured <= 1.7e-6
TOL_STEP_NORM = 1e-4
# EMA (decay 0.9999): lerp(init, W, 1 - decay), so per tensor max |E - E_1| <= (1 - decay) max |W - W_1|
#   + 1 ulp of max |E_1|; measured: 1 ulp beyond the first term (the 1-process EMA against
#   torch.lerp(init, W_1, 1 - decay): 0 ulp)
TOL_EMA_ULPS = 2.0
# loss metrics (global means), relative; measured <= 1.1e-7
TOL_METRIC = 1e-6


class LatentStore:
    """Stands in for an encoded ImageNet latent store (data.Store's batch contract): example i is a
    fixed N(0, 1) latent of shape 4x32x32 (sd-vae latents times their scale are about unit
    variance) with label i % 1000, whatever generator draws the batch."""
    shape, num_classes = (4, 32, 32), 1000

    def __len__(self):
        return STORE

    def batch(self, indices, generator):
        x = torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(int(i))) for i in indices])
        return x.to(generator.device), torch.as_tensor(indices % self.num_classes, device=generator.device)


# --------------------------------------------------------------------------- the worker (under torchrun)
INF = math.inf


def _floats(t: torch.Tensor) -> list[float]:
    return torch.stack(list(t) if isinstance(t, (list, tuple)) else [t]).flatten().tolist()


def _norms(tensors) -> list[float]:
    """Per tensor its 2-norm (the ranks compare them exactly: the same all-reduced gradients, the same update)."""
    return _floats(torch._foreach_norm(tensors, 2))


def _stats(xs, refs=None) -> tuple[list[float], list[float]]:
    """Per tensor of xs (or xs - refs, one tensor at a time: no second 131M-element copy): max |.|
    and 2-norm."""
    amax, norm = [], []
    for i, x in enumerate(xs):
        d = x if refs is None else x - refs[i]
        amax.append(d.abs().max())
        norm.append(torch.linalg.vector_norm(d))
    return _floats(amax), _floats(norm)


class Scale:
    """A reference list of tensors (the 1-process step's gradients, or the change of its weights
    from the initial ones: xs - bases) summarised per tensor: max |.| and 2-norm."""

    def __init__(self, xs, bases=None):
        self.max, self.norm = _stats(xs, bases)


def _ulp(values: list[float]) -> list[float]:
    """fp32's unit in the last place at each |value|."""
    a = torch.tensor(values).abs()
    return (torch.nextafter(a, torch.full_like(a, INF)) - a).tolist()


def _gap(names, xs, refs, scale: Scale, grads=None) -> dict:
    """xs against refs: max |x - ref| over all tensors ("abs"); the worst tensor's max |x - ref| over
    its scale's max ("rel", which tensor: "worst"); ||x - ref|| / ||scale|| over all ("norm");
    "per_tensor": each tensor's max |x - ref|. With `grads` (weights): |g| of the 1-process step
    where the worst tensor's difference is largest."""
    amax, n2 = _stats(xs, refs)
    rel = [a / s if s > 0 else (0.0 if a == 0 else INF) for a, s in zip(amax, scale.max)]
    i = max(range(len(rel)), key=rel.__getitem__)
    out = {"abs": max(amax), "rel": rel[i], "worst": names[i], "scale": max(scale.max), "per_tensor": amax,
           "norm": math.sqrt(sum(v * v for v in n2)) / math.sqrt(sum(v * v for v in scale.norm))}
    if grads is not None:
        out["grad_there"] = grads[i].flatten()[(xs[i] - refs[i]).abs().argmax()].abs().item()
    return out


def _ema_gap(es, e0s, w_refs, decay: float, w_amax=None) -> dict:
    """The EMA against the 1-process one, lerp(init, W_1, 1 - decay) as EMA.update computes it after
    one step (built a tensor at a time, not kept). Rounded to fp32 either side, so per tensor
    max |E - E_1| <= (1 - decay) max |W - W_1| (w_amax; none for the 1-process EMA itself) + 1 ulp
    of max |E_1|. "ulps": the largest excess over the first term, in units of that ulp; "abs": the
    largest max |E - E_1|."""
    amax, top = [], []
    for e, e0, w in zip(es, e0s, w_refs):
        e1 = torch.lerp(e0, w, 1 - decay)
        amax.append((e - e1).abs().max())
        top.append(e1.abs().max())
    amax, top = _floats(amax), _floats(top)
    w_amax = w_amax or [0.0] * len(amax)
    excess = [(a - (1 - decay) * aw) / u for a, aw, u in zip(amax, w_amax, _ulp(top))]
    return {"ulps": max(excess), "abs": max(amax)}


def _through_the_wrapper(net, ddp, z, r, t, v_g, y) -> dict:
    """The case users of other reproductions report: the generic jvp (objective.jvp) through the DDP
    wrapper itself, not the bare module, on examples (z, r, t) along v01's tangents (v_g, 0, 1),
    without a graph as the split strategy runs it. Each call starts from the state a gradient-carrying
    forward through DDP leaves (require_forward_param_sync, as in every training step; DDP is also
    built in it), in which DDP's forward broadcasts rank 0's buffers into the module unless
    forward_sync_buffers (torch >= 2.13; formerly broadcast_buffers) is off. Per api and setting:
    du/dt's max |difference| to the bare module's (and its scale), or the error."""
    from meanflow.objective.jvp import jvp

    def u_of(m):
        return lambda z_, r_, t_: m(z_, t_, t_ - r_, y)

    out, prim, tang = {}, (z, r, t), (v_g, torch.zeros_like(r), torch.ones_like(t))
    for api in ("forward_ad", "func"):
        _, du_bare = jvp(u_of(net), prim, tang, api)
        out[api] = {}
        for sync in (True, False):
            ddp.forward_sync_buffers, ddp.require_forward_param_sync = sync, True
            try:
                _, du = jvp(u_of(ddp), prim, tang, api)
                out[api][f"forward_sync_buffers={sync}"] = {"abs": (du - du_bare).abs().max().item(),
                                                            "scale": du_bare.abs().max().item()}
            except RuntimeError as e:
                out[api][f"forward_sync_buffers={sync}"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    ddp.forward_sync_buffers = True
    return out


def worker(out: Path):
    import dataclasses

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from meanflow import config
    from meanflow.models import build_model
    from meanflow.models import tangent as explicit_tangent
    from meanflow.objective import build_objective
    from meanflow.runtime import generator, seed_of
    from meanflow.training.batches import EpochSampler, load_batch
    from meanflow.training.distributed import GradAverager, init_distributed
    from meanflow.training.step import EMA, make_optimizer, step

    torch.set_num_threads(1)
    env = init_distributed("cpu")
    assert env.world == 2 and dist.get_backend() == "gloo"
    rank, res, t_start = env.rank, {"runs": {}, "phases": []}, time.perf_counter()

    def phase(what):
        res["phases"].append((what, round(time.perf_counter() - t_start, 2), round(time.process_time(), 2)))

    cfg = config.load(ROOT / "params.yaml", tier="imagenet")
    mc, tc, nc = cfg.meanflow, cfg.train, cfg.data.num_classes
    res["cfg"] = {"model": cfg.model.name, "ratio": mc.ratio, "omega": mc.omega, "kappa": mc.kappa,
                  "class_drop": mc.class_drop, "mask_layout": mc.mask_layout, "strategy": mc.strategy,
                  "jvp_api": mc.jvp_api, "objective": mc.objective, "lr": tc.lr, "ema": tc.ema,
                  "shape": [cfg.data.channels, cfg.data.input_size, cfg.data.input_size], "num_classes": nc}

    # the model, once: the trainer's seeded init (loop.Replica), the adaLN-Zero layers drawn, rank 0's weights broadcast
    torch.manual_seed(seed_of(tc.seed, "init"))
    net = build_model(cfg)
    g = generator("cpu", tc.seed, "adaLN-Zero drawn")
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "adaLN_modulation" in n or n.startswith("final_layer.linear"):
                p.normal_(0, 0.02, generator=g)
        for v in net.state_dict().values():
            dist.broadcast(v, 0)
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    init = {k: v.clone() for k, v in net.state_dict().items()}
    base = [init[n] for n in names]
    res["params"] = sum(p.numel() for p in params)
    res["explicit_supported"] = explicit_tangent.supports(net)
    res["init_norms"] = _norms(base)
    ema = EMA(net, tc.ema)
    ddp = DistributedDataParallel(net)   # CPU, gloo; broadcasts rank 0's state as it is built
    phase("built")

    # the draws: each rank's contiguous share of the global batch, and the whole batch (1 process)
    objective = build_objective(mc, nc)
    store, sampler = LatentStore(), EpochSampler(STORE, tc.seed)
    share = load_batch(store, sampler, objective, 0, BATCH, rank, env.world, tc.seed, "cpu")
    whole = load_batch(store, sampler, objective, 0, BATCH, 0, 1, tc.seed, "cpu")
    lo, hi = rank * BATCH // env.world, (rank + 1) * BATCH // env.world
    res["share_is_slice"] = all(torch.equal(getattr(share, k), getattr(whole, k)[lo:hi])
                                for k in ("x", "y", "e", "t", "r", "drop"))
    res["jvp_rows"] = int((share.t != share.r).sum())
    res["dropped"] = int(share.drop.sum())
    with torch.no_grad():   # the jvp's part of the target on this rank's r != t rows: v_g - u_tgt = (t - r) du/dt
        d = share.draws()
        z, v, v_g, y_in = objective.velocities(net, share.x, share.y, d["e"], d["t"], d["drop"])
        u, u_tgt = objective.u_and_target(net, z, d["t"], d["r"], v_g, y_in)
        mf = d["t"] != d["r"]
        res["jvp_term"] = (v_g - u_tgt)[mf].abs().max().item() if mf.any() else 0.0
        res["u_abs_mean"] = u.abs().mean().item()
        res["wrapper"] = _through_the_wrapper(net, ddp, z[mf], d["r"][mf], d["t"][mf], v_g[mf], y_in[mf])
        del z, v, v_g, y_in, u, u_tgt
    phase("draws, jvp probes")

    def fresh():
        """The initial weights and EMA, no gradients, a new optimiser."""
        net.load_state_dict(init)
        ema.net.load_state_dict(init)
        for p in params:
            p.grad = None
        return make_optimizer(net, tc)

    def record(key, vals, seconds):
        assert all(p.grad is not None for p in params), f"{key}: parameters without a gradient"
        w, gr, e = [p.detach() for p in params], [p.grad for p in params], list(ema.net.parameters())
        res["runs"][key] = {"metrics": vals, "seconds": seconds, "norms": {"w": _norms(w), "g": _norms(gr), "e": _norms(e)}}
        phase(key)
        return res["runs"][key]

    def compare(entry, ref):
        w, gr, e = [p.detach() for p in params], [p.grad for p in params], list(ema.net.parameters())
        vs = entry["vs"] = {"grad": _gap(names, gr, ref["g"], ref["g_scale"]),
                            "weights": _gap(names, w, ref["w"], ref["w_scale"], grads=ref["g"])}
        vs["ema"] = _ema_gap(e, base, ref["w"], tc.ema, vs["weights"]["per_tensor"])
        # Adam's first step against the gradients' difference: (lr / eps) max |G - G_1| + 2 ulp of max |W_1|
        bound = [lr_eps * a + 2 * u for a, u in zip(vs["grad"]["per_tensor"], _ulp(ref["w_max"]))]
        vs["weights"]["adam"] = max(a / b for a, b in zip(vs["weights"]["per_tensor"], bound))
        phase("compared")

    kept = [torch.empty_like(b) for b in base]   # the 1-process step's weights, one buffer for every jvp path
    for api in APIS:
        obj = build_objective(dataclasses.replace(mc, jvp_api=api), nc)
        # 1 process: rank 0 on the whole batch (the reference), rank 1 on its half alone (the control)
        opt = None
        opt = fresh()
        (group,) = opt.param_groups
        assert group["weight_decay"] == 0 and not group["amsgrad"]   # the first step is lr * g / (|g| + eps)
        lr_eps = res["cfg"]["lr/eps"] = group["lr"] / group["eps"]
        t0 = time.perf_counter()
        b = whole if rank == 0 else share
        vals, _ = step(obj, net, opt, b.x, b.y, ema=ema, draws=b.draws(), precision=tc.precision)
        entry = record(f"{'one' if rank == 0 else 'half'}/{api}", vals[0], time.perf_counter() - t0)
        # the reference: its gradients taken over, its weights copied; its EMA is lerp(init, W_1, 1 - decay)
        torch._foreach_copy_(kept, [p.detach() for p in params])
        ref = {"g": [p.grad for p in params], "w": kept, "g_scale": Scale([p.grad for p in params]),
               "w_scale": Scale(kept, base), "w_max": _floats(torch._foreach_norm(kept, INF))}
        e = list(ema.net.parameters())
        entry["step"] = {"weights": max(ref["w_scale"].max), "ema": max(_stats(e, base)[0]),
                         "ema_vs_lerp": _ema_gap(e, base, kept, tc.ema)}
        phase("reference")
        # 2 processes, gradients averaged by the project's GradAverager
        opt = None
        opt = fresh()
        averager = GradAverager(params, env.world)
        t0 = time.perf_counter()
        vals, _ = step(obj, net, opt, share.x, share.y, ema=ema, averager=averager, draws=share.draws(),
                       precision=tc.precision)
        compare(record(f"two/{api}", vals[0], time.perf_counter() - t0), ref)   # rank 1: against its half alone
        del averager
        # 2 processes, the gradient-carrying forward through DDP, the jvp through the bare net
        opt = None
        opt = fresh()
        t0 = time.perf_counter()
        vals, _ = step(obj, net, opt, share.x, share.y, ema=ema, grad_net=ddp, draws=share.draws(),
                       precision=tc.precision)
        local = torch.tensor(vals[0], dtype=torch.float64)   # step reports this rank's means without an averager
        dist.all_reduce(local)
        compare(record(f"ddp/{api}", (local / env.world).tolist(), time.perf_counter() - t0), ref)
        del ref
    res["seconds"] = time.perf_counter() - t_start
    res["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the tests
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_jvp")
    log = out / "torchrun.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, str(out)],
                           cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert p.returncode == 0, log.read_text()[-6000:]
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"\ntorchrun: {time.perf_counter() - t0:.1f} s wall; workers {res[0]['seconds']:.1f} s / {res[1]['seconds']:.1f} s, "
          f"peak RSS {res[0]['max_rss_gb']:.1f} / {res[1]['max_rss_gb']:.1f} GiB")
    return res


def _show(what, gap):
    if "ulps" in gap:
        return f"{what}: max abs {gap['abs']:.3g}, beyond (1 - decay) |W - W_1| {gap['ulps']:.3g} ulp"
    there = f", |g| there {gap['grad_there']:.2g}" if "grad_there" in gap else ""
    adam = f"; {gap['adam']:.3g} of Adam's bound" if "adam" in gap else ""
    return (f"{what}: max abs {gap['abs']:.3g} (scale {gap['scale']:.3g}), worst tensor {gap['rel']:.3g} of its "
            f"scale ({gap['worst']}{there}), norm-wise {gap['norm']:.3g}{adam}")


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_setting_is_mf_b4_with_a_jvp_on_both_ranks(ranks):
    r0, r1 = ranks
    c = r0["cfg"]
    assert c["model"] == "MF-B/4" and abs(r0["params"] / 1e6 - 131) < 1, r0["params"]
    assert c["shape"] == [4, 32, 32] and c["num_classes"] == 1000
    assert (c["objective"], c["ratio"], c["mask_layout"], c["strategy"], c["jvp_api"]) == \
        ("meanflow", 0.25, "front", "split", "explicit")
    assert r0["explicit_supported"]   # jvp_api explicit runs the hand-derived tangent, no forward_ad fallback
    assert r0["init_norms"] == r1["init_norms"]   # one init on both ranks
    for r in ranks:
        assert r["share_is_slice"]   # each rank: its contiguous share of the global batch's draws
        assert r["jvp_rows"] >= 1, "a rank without r != t rows"
        assert r["jvp_term"] > 0.05, r["jvp_term"]   # du/dt enters the target: (t - r) du/dt is not ~0
    print(f"\nrows with r != t per rank: {r0['jvp_rows']}, {r1['jvp_rows']}; label-dropped: {r0['dropped']}, "
          f"{r1['dropped']}; max |(t - r) du/dt| {r0['jvp_term']:.3g}, {r1['jvp_term']:.3g}; mean |u| "
          f"{r0['u_abs_mean']:.3g}; phases (s) rank 0: {r0['phases']}")


def _check_equal_one(ranks, mode, api):
    r0, r1 = ranks
    one, run = r0["runs"][f"one/{api}"], r0["runs"][f"{mode}/{api}"]
    m = _rel(run["metrics"], one["metrics"])
    print(f"\n{mode} vs 1 process, jvp_api {api} (step {run['seconds']:.1f} s; 1 process {one['seconds']:.1f} s):\n  " +
          "\n  ".join(_show(k, run["vs"][k]) for k in ("grad", "weights", "ema")) + f"\n  metrics: max rel {m:.3g}"
          f"\n  1-process step: max |change| {one['step']['weights']:.3g} (weights), {one['step']['ema']:.3g} (EMA); "
          f"its EMA against lerp(init, W_1): {one['step']['ema_vs_lerp']['ulps']:.3g} ulp")
    assert run["norms"] == r1["runs"][f"{mode}/{api}"]["norms"]   # both ranks hold the same weights, grads, EMA
    # the step moved the weights (Adam's first step: about lr per entry) and the EMA
    lr, decay = r0["cfg"]["lr"], r0["cfg"]["ema"]
    assert one["step"]["weights"] > 0.5 * lr and one["step"]["ema"] > 0.5 * lr * (1 - decay), one["step"]
    assert one["step"]["ema_vs_lerp"]["ulps"] <= TOL_EMA_ULPS, one["step"]   # the 1-process EMA is lerp(init, W_1)
    vs = run["vs"]
    assert vs["grad"]["rel"] <= TOL_GRAD, _show("grad", vs["grad"])
    assert vs["weights"]["adam"] <= 1 and vs["weights"]["norm"] <= TOL_STEP_NORM, _show("weights", vs["weights"])
    assert vs["ema"]["ulps"] <= TOL_EMA_ULPS, _show("ema", vs["ema"])
    assert m <= TOL_METRIC, (run["metrics"], one["metrics"])


@pytest.mark.parametrize("api", APIS)
def test_two_processes_equal_one(ranks, api):
    _check_equal_one(ranks, "two", api)


@pytest.mark.parametrize("api", APIS)
def test_ddp_wrapped_equals_one(ranks, api):
    _check_equal_one(ranks, "ddp", api)


@pytest.mark.parametrize("api", APIS)
def test_one_rank_half_alone_is_far_off(ranks, api):
    """The control: rank 1's half of the batch alone, not averaged, against the 2-process step (a
    trainer that forgot to average): the same comparison fails by orders of magnitude."""
    half, run = ranks[1]["runs"][f"half/{api}"], ranks[1]["runs"][f"two/{api}"]
    m = _rel(run["metrics"], half["metrics"])
    print(f"\nhalf alone vs 2 processes, jvp_api {api}:\n  " +
          "\n  ".join(_show(k, run["vs"][k]) for k in ("grad", "weights", "ema")) + f"\n  metrics: max rel {m:.3g}")
    vs = run["vs"]
    assert vs["grad"]["rel"] > 1000 * TOL_GRAD and vs["grad"]["norm"] > 0.1
    assert vs["weights"]["rel"] > 1 and vs["weights"]["norm"] > 1000 * TOL_STEP_NORM   # > 1: steps of opposite sign
    assert m > 100 * TOL_METRIC
    # the EMA (decay 0.9999) moved by 1e-4 of the weights' step: it follows the weights, within its
    # ulps of them either way; its check is that, not a second witness of the averaging


def test_jvp_paths_agree(ranks):
    """The three jvp paths' 1-process steps: the same gradient (per tensor 2-norms) and metrics up
    to float rounding."""
    runs = ranks[0]["runs"]
    ref = runs["one/explicit"]
    for api in APIS[1:]:
        g = _rel(runs[f"one/{api}"]["norms"]["g"], ref["norms"]["g"])
        m = _rel(runs[f"one/{api}"]["metrics"], ref["metrics"])
        print(f"\n{api} vs explicit, 1 process: per-tensor gradient norms max rel {g:.3g}; metrics max rel {m:.3g}")
        assert g <= TOL_GRAD and m <= TOL_METRIC


# the case users report, at its root: the generic jvp through the DDP wrapper itself
FUNC_THROUGH_DDP = ("torch 2.14.1: torch.func.jvp through a DistributedDataParallel wrapper raises RuntimeError "
                    "'During a grad (vjp, jvp, grad, etc) transform, the function provided attempted to call in-place "
                    "operation (aten::copy_) that would mutate a captured Tensor': DDP's forward copies rank 0's "
                    "buffers into the module (forward_sync_buffers, default True; the DiT's one buffer is pos_embed) "
                    "on its first forward and on every forward after a gradient-carrying one, i.e. every training "
                    "step. The objective runs the jvp through the bare module (grad_net = the wrapper); "
                    "forward_sync_buffers=False also avoids it")


@pytest.mark.parametrize("api", ["forward_ad", pytest.param("func", marks=pytest.mark.xfail(
    strict=True, raises=AssertionError, reason=FUNC_THROUGH_DDP))])
def test_jvp_through_the_ddp_wrapper(ranks, api):
    for r in ranks:
        rec = r["wrapper"][api]["forward_sync_buffers=True"]
        print(f"\njvp_api {api} through DDP (forward_sync_buffers=True), rank {ranks.index(r)}: {rec}")
        if "error" in rec and "mutate a captured Tensor" not in rec["error"]:
            pytest.fail(f"not the known failure: {rec['error']}")
        assert "error" not in rec, rec["error"]
        assert rec["abs"] <= TOL_GRAD * rec["scale"]


@pytest.mark.parametrize("api", ["forward_ad", "func"])
def test_jvp_through_the_ddp_wrapper_without_buffer_sync(ranks, api):
    for r in ranks:
        rec = r["wrapper"][api]["forward_sync_buffers=False"]
        print(f"\njvp_api {api} through DDP (forward_sync_buffers=False), rank {ranks.index(r)}: {rec}")
        assert "error" not in rec, rec["error"]
        assert rec["abs"] <= TOL_GRAD * rec["scale"] and rec["scale"] > 0.05


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
