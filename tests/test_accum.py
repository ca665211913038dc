"""train.accum (gradient accumulation): N micro-batches of b equal one batch of N * b with the same
draws (model and EMA weights within float rounding, the same logged losses) for MeanFlow, iMF and
stacked replicas; a run resumes under another accum; 2 gloo processes x accum 2 equal 1 process;
the 1/N weight and the one all-reduce per step; the divisibility error; `auto` takes
meanflow.costs.pick_accum's N, logs it, and the manifest records it."""
import json
import logging
import shutil
from types import SimpleNamespace as NS

import pytest
import torch
import yaml
from safetensors.torch import load_file

import test_imf
from meanflow import config, layout, plan
from meanflow.data import Store
from meanflow.models import build_model
from meanflow.objective import MeanFlow
from meanflow.training import batches
from meanflow.training.distributed import Dist, GradAverager
from meanflow.training.loop import Loop, Replica, accum_of, train
from meanflow.training.records import METRICS, TrainError
from meanflow.training.step import step
from test_train import data_root, train_two_ranks, write_params  # noqa: F401 (fixture)

STEPS, BATCH = 4, 24
CPU = torch.device("cpu")
# Float tolerance of accumulated vs one-batch runs (and 2 ranks vs 1): the gradients sum in another
# order (fp32), so weights after STEPS Adam steps differ by rounding. Measured (printed by each
# test; 2-core CPU, torch fp32): max |diff| of model and EMA weights 1.5e-8 to 4.1e-8 in every
# comparison here, logged losses 1.4e-7 to 1.8e-7 relative. The bounds are test_train's
# 2-process ones, 25x and more above that.
RTOL, ATOL, LOSS_RTOL = 1e-5, 1e-6, 1e-5


def params(path, data_root, runs, meanflow=None, **kw):
    """test_train's tiny DiT params with log_every 1 (every step's losses) and a checkpoint at STEPS / 2."""
    p = write_params(path, data_root, runs, **{"steps": STEPS, "batch": BATCH, "ckpt_every": STEPS // 2,
                                               "log_every": 1, **kw})
    if meanflow:
        doc = yaml.safe_load(p.read_text())
        doc["tiers"]["t"]["meanflow"] = meanflow
        p.write_text(yaml.safe_dump(doc))
    return p


def logged(rd) -> dict[str, list[float]]:
    out = {}
    for m in METRICS:
        rows = (rd / "dvclive" / "plots" / "metrics" / "train" / f"{m}.tsv").read_text().split("\n")[1:]
        out[m] = [float(r.split("\t")[1]) for r in rows if r]
    return out


def assert_same_run(a, b, what: str, k: int = STEPS):
    """Run dirs a and b: model and EMA weights at step k within RTOL/ATOL (the max difference
    printed), every logged loss within LOSS_RTOL."""
    for f in ("model.safetensors", "ema.safetensors"):
        wa, wb = (load_file(d / "checkpoints" / f"step-{k:08d}" / f) for d in (a, b))
        diff = max((wa[w] - wb[w]).abs().max().item() for w in wa)
        print(f"{what} {f}: max |diff| = {diff:.3g}")
        for w in wa:
            torch.testing.assert_close(wb[w], wa[w], rtol=RTOL, atol=ATOL, msg=f"{what} {f} {w}")
    la, lb = logged(a), logged(b)
    assert len(la["loss"]) == k
    worst = max(abs(x - y) / abs(y) for m in METRICS for x, y in zip(la[m], lb[m]) if y)
    print(f"{what} logged losses: max relative diff = {worst:.3g}")
    for m in METRICS:
        assert lb[m] == pytest.approx(la[m], rel=LOSS_RTOL), m


def moved(rd) -> bool:
    """The run's weights did change over its steps (the comparisons are not of two initial nets)."""
    a, b = (load_file(rd / "checkpoints" / f"step-{k:08d}" / "model.safetensors") for k in (STEPS // 2, STEPS))
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """MeanFlow, batch 24, accum 1, one process."""
    d = tmp_path_factory.mktemp("accum_ref")
    cfg = config.load(params(d / "p.yaml", data_root, d / "runs", accum=1))
    train(cfg, progress=False)
    assert moved(cfg.run_dir)
    return cfg.run_dir


# --------------------------------------------------------------------------- equal to one batch
def test_accumulated_equals_one_batch_and_resumes_under_another_accum(data_root, reference, tmp_path, caplog):
    """Steps 1-2 as 3 micro-batches of 8, checkpoint, then resumed as 4 micro-batches of 6 (accum is
    not in the run id): the one-batch run's weights, EMA and losses."""
    a = config.load(params(tmp_path / "a.yaml", data_root, tmp_path / "runs", accum=3))
    b = config.load(params(tmp_path / "b.yaml", data_root, tmp_path / "runs", accum=4))
    assert a.run_id == b.run_id and a.run_dir == b.run_dir
    loop = Loop(Replica(a, Dist(0, 1, CPU)), progress=False)
    loop.open()
    try:
        assert loop.accum == 3
        while loop.k < STEPS // 2:
            loop.advance()
    finally:
        loop.close()
    caplog.set_level(logging.INFO, logger="meanflow.training.records")
    train(b, progress=False)
    assert "resuming run" in caplog.text
    assert_same_run(reference, b.run_dir, "MeanFlow accum 3 then 4")
    env = json.loads((b.run_dir / "train_manifest.json").read_text())["env"]
    assert (env["accum"], env["micro_batch"]) == (4, 6)   # the last attempt's
    assert json.loads((reference / "train_manifest.json").read_text())["env"]["micro_batch"] == BATCH


def test_imf_accumulated_equals_one_batch(data_root, tmp_path):
    runs = {}
    for n in (1, 4):
        p = test_imf.write_params(tmp_path / f"{n}.yaml", data_root, tmp_path / f"r{n}", steps=STEPS, batch=16,
                                  ckpt_every=STEPS // 2, keep_ckpts_done=2, log_every=1, accum=n)
        cfg = config.load(p)
        train(cfg, progress=False)
        runs[n] = cfg.run_dir
    assert moved(runs[1])
    assert_same_run(runs[1], runs[4], "iMF accum 4")


def test_stacked_replicas_accumulated_equal_one_batch(data_root, tmp_path, monkeypatch):
    """Two replicas trained stacked (one StackedDiT), accum 2 vs 1: each replica's block splits
    alike and each micro-batch gets its own tangent rows."""
    mf = {"jvp_api": "explicit"}
    sizes, advance = [], Loop.advance
    monkeypatch.setattr(Loop, "advance", lambda self, *a: sizes.append(self.R) or advance(self, *a))
    dirs = {}
    for n in (1, 2):
        p = params(tmp_path / f"{n}.yaml", data_root, tmp_path / f"r{n}", meanflow=mf, accum=n, replicates=2,
                   group_replicas=True)
        full = config.load(p)
        cfgs = [plan.replica(full, i) for i in range(2)]
        train(*cfgs, progress=False)
        dirs[n] = [layout.run(c).root for c in cfgs]
    assert sizes == [2] * (2 * STEPS)   # trained stacked both times
    for i in range(2):
        assert moved(dirs[1][i])
        assert_same_run(dirs[1][i], dirs[2][i], f"stacked replica {i} accum 2")


def test_micro_batches_of_stacked_replicas_split_each_block():
    R, n, N = 2, 6, 3
    t = torch.rand(R * n)
    r = torch.where(torch.rand(R * n) < 0.5, t, t / 2)
    x = torch.arange(R * n).float()
    draws = {"t": t, "r": r, "e": x[:, None], "jvp_rows": batches.union_rows(t, r, R), "groups": R}
    parts = batches.micro_batches(x, None, draws, N)
    m = n // N
    for j, (xm, ym, dm) in enumerate(parts):
        want = torch.cat([torch.arange(i * n + j * m, i * n + (j + 1) * m) for i in range(R)]).float()
        assert torch.equal(xm, want) and torch.equal(dm["e"][:, 0], want) and ym is None and dm["groups"] == R
        assert torch.equal(dm["jvp_rows"], batches.union_rows(dm["t"], dm["r"], R))
    # plain batches: views, no copies
    xm = batches.micro_batches(x, x, {"t": t}, 4)[1][0]
    assert xm.data_ptr() == x[3:].data_ptr() and len(xm) == 3


# --------------------------------------------------------------------------- data-parallel
def test_two_gloo_processes_with_accum_2_equal_one_process(data_root, reference, tmp_path):
    """2 ranks x 2 micro-batches of 6 = 1 process on 24: gradients averaged over ranks once."""
    two = params(tmp_path / "two.yaml", data_root, tmp_path / "two", accum=2)
    train_two_ranks(two, tmp_path)
    rd = config.load(two).run_dir
    m = json.loads((rd / "train_manifest.json").read_text())
    assert m["world_size"] == 2 and (m["env"]["accum"], m["env"]["micro_batch"]) == (2, 6)
    assert_same_run(reference, rd, "2 ranks x accum 2")


# --------------------------------------------------------------------------- the 1/N weight, one all-reduce
@pytest.mark.parametrize("ranks", [False, True])
def test_gradient_is_the_batch_mean_and_reduced_once(data_root, tmp_path, monkeypatch, ranks):
    """With plain SGD at lr 1 a step moves the weights by minus the gradient itself (Adam would hide a
    missing 1/N: it is scale-invariant): accum 4 moves them as accum 1, up to rounding, not 4x. With
    a GradAverager (world 1; all_reduce counted) the step reduces the metrics once and each gradient
    buffer once, whatever N."""
    cfg = config.load(params(tmp_path / "p.yaml", data_root, tmp_path / "runs"))
    store = Store.from_config(cfg)
    obj = MeanFlow(cfg.meanflow, 10)
    b = batches.load_batch(store, batches.EpochSampler(len(store), 0), obj, 0, BATCH, 0, 1, 0, CPU)
    calls = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: calls.append(t.numel()))
    torch.manual_seed(0)
    net0 = build_model(cfg)
    with torch.no_grad():   # adaLN-zero starts at u = 0: perturb so that every weight gets a gradient
        for q in net0.parameters():
            q.add_(0.05 * torch.randn_like(q))
    moves, vals = {}, {}
    for n in (1, 4):
        net = build_model(cfg)
        net.load_state_dict(net0.state_dict())
        avg = GradAverager(net.parameters(), 1) if ranks else None
        calls.clear()
        vals[n], _ = step(obj, net, torch.optim.SGD(net.parameters(), lr=1.0), b.x, b.y, averager=avg,
                          draws=b.draws(), accum=n)
        moves[n] = torch.cat([(p0 - p).flatten() for p0, p in zip(net0.parameters(), net.parameters())]).detach()
        if ranks:
            assert calls == [len(METRICS) + 1, *(buf.numel() for buf in avg.buffers)], n
    assert moves[1].norm() > 0
    diff = (moves[4] - moves[1]).abs().max().item()
    print(f"SGD move, accum 4 vs 1: max |diff| = {diff:.3g} of max |move| {moves[1].abs().max().item():.3g}")
    # measured max |diff| 3.0e-8 of moves up to 0.13; a missing 1/N would be 3x the move
    torch.testing.assert_close(moves[4], moves[1], rtol=1e-5, atol=1e-6)
    assert vals[4][0] == pytest.approx(vals[1][0], rel=1e-6)


# --------------------------------------------------------------------------- errors, auto
def test_batch_not_divisible_by_world_times_accum(data_root, tmp_path):
    cfg = config.load(params(tmp_path / "p.yaml", data_root, tmp_path / "runs", accum=5))
    group = NS(replicas=[NS(cfg=cfg, memory=None)])
    with pytest.raises(TrainError, match=r"train.batch = 24 is not divisible by the world size 2 x train.accum = 5: "
                                         r"each rank's 12 examples must split into 5 equal micro-batches"):
        accum_of(group, Dist(0, 2, CPU))
    assert accum_of(NS(replicas=[NS(cfg=config.load(params(tmp_path / "q.yaml", data_root, tmp_path / "runs",
                                                               accum=6)), memory=None)]), Dist(0, 2, CPU)) == 6
    with pytest.raises(TrainError, match=r"world size 1 x train.accum = 5"):
        train(cfg, progress=False)
    assert not (cfg.run_dir / "checkpoints").exists()


def test_auto_takes_pick_accum_logs_and_records_it(data_root, tmp_path, monkeypatch, caplog):
    from meanflow import costs
    from meanflow.runtime import device_memory
    asked = []

    def pick(cfg, per_rank_batch, capacity_bytes, **kw):
        asked.append((cfg.train.accum, per_rank_batch, capacity_bytes, kw))
        return 3, "a test's memory model"
    p = params(tmp_path / "p.yaml", data_root, tmp_path / "runs", steps=1)
    doc = yaml.safe_load(p.read_text())
    del doc["tiers"]["t"]["train"]["accum"]   # test_train's params pin accum 1
    p.write_text(yaml.safe_dump(doc))
    cfg = config.load(p)
    assert cfg.train.accum == "auto"   # the default
    caplog.set_level(logging.INFO, logger="meanflow.training.loop")
    train(cfg, progress=False)   # the real memory model: a tiny DiT fits the CPU's memory at once
    assert "train.accum auto: N = 1, micro-batch 24 of the rank's 24 (" in caplog.text
    shutil.rmtree(tmp_path / "runs")
    caplog.clear()
    monkeypatch.setattr(costs, "pick_accum", pick)   # one that asks for 3
    train(cfg, progress=False)
    assert len(asked) == 1 and asked[0][:2] == ("auto", BATCH)
    free = device_memory(CPU)
    assert 0 < asked[0][2] and abs(asked[0][2] - free) < 0.5 * free   # the device's free bytes, as measured
    kw = asked[0][3]   # the run's own net, one rank, fp32 on the CPU, no GPU reserve
    assert isinstance(kw["net"], torch.nn.Module) and (kw["world"], kw["autocast_dtype"], kw["reserve"]) == (1, None, 0)
    assert "train.accum auto: N = 3, micro-batch 8 of the rank's 24 (a test's memory model)" in caplog.text
    env = json.loads((cfg.run_dir / "train_manifest.json").read_text())["env"]
    assert (env["accum"], env["micro_batch"]) == (3, 8)
    # data-parallel: every rank takes the largest N any rank's memory asks for (a group of one here)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert accum_of(NS(replicas=[NS(cfg=cfg, memory=2 ** 30, net=None)]), Dist(0, 2, CPU)) == 3
    finally:
        dist.destroy_process_group()
    # an N that does not divide the share: the error says auto chose it, and why
    monkeypatch.setattr(costs, "pick_accum", lambda *a, **k: (5, "odd"))
    group = NS(replicas=[NS(cfg=cfg, memory=2 ** 30, net=None)])
    with pytest.raises(TrainError, match=r"train.accum = auto \(N = 5: odd\)"):
        accum_of(group, Dist(0, 1, CPU))
