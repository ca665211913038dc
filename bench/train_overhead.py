"""Train-stage overhead: one iteration of the stage's loop (training.loop.Loop.advance: batch
indices, store batch, per-step generators and draws, the loss check's host sync, EMA, DVCLive lines
every train.log_every steps, tqdm) against the bare objective step (training.step.step on one fixed
batch) for the same model, batch size and device. Interleaved rounds in one process; medians.

    python bench/train_overhead.py [--tier tiny] [--rounds 7] [--steps 10] [--device cpu]
The tier's store must exist (python -m stages.acquire/encode); for the digits tier a missing one
is built in a temporary directory. Target (issue 4): stage / bare <= 1.1.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from meanflow import config, data, runtime  # noqa: E402
from meanflow.models import build_model  # noqa: E402
from meanflow.objective import MeanFlow  # noqa: E402
from meanflow.training.distributed import Dist  # noqa: E402
from meanflow.training.loop import Loop, Replica  # noqa: E402
from meanflow.training.step import make_optimizer, step  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps, device):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(config.PARAMS_PATH))
    ap.add_argument("--tier", default="tiny")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="train_overhead_"))
    cfg = config.load(args.params, tier=args.tier)
    over = {"train": {"steps": 10**9, "ckpt_every": 10**9, "device": args.device, "runs_root": str(tmp / "runs")}}
    try:
        data.Store.from_config(cfg)
    except data.DataError:
        if cfg.data.dataset != "digits":
            raise
        over["data"] = {"root": str(tmp / "data")}  # build the embedded digits store here
        built = config.build(config.deep_merge(cfg.raw, over), cfg.tier)
        data.acquire(built)
        data.encode(built)
    cfg = config.build(config.deep_merge(cfg.raw, over), cfg.tier)

    replica = Replica(cfg, Dist(0, 1, runtime.device(args.device)))
    trainer = Loop(replica)
    trainer.open()
    device, tc = replica.device, cfg.train
    torch.manual_seed(0)
    net = build_model(cfg).to(device)
    opt, obj = make_optimizer(net, tc), MeanFlow(cfg.meanflow, cfg.data.num_classes)
    g = torch.Generator(device).manual_seed(0)
    x, y = replica.store.batch(range(tc.batch), torch.Generator(device).manual_seed(0))
    y = y if cfg.data.num_classes else None

    bare = lambda: step(obj, net, opt, x, y, generator=g)  # noqa: E731
    stage = trainer.advance
    for fn in (bare, stage):
        timed(fn, 3, device)  # warm-up
    times = {"bare": [], "stage": []}
    for _ in range(args.rounds):  # interleaved: machine noise hits both alike
        times["bare"].append(timed(bare, args.steps, device))
        times["stage"].append(timed(stage, args.steps, device))
    # where the stage's extra time goes, per step
    if trainer.pending:  # the prefetch thread (GPU) must be idle while we call load() here
        trainer.pending[1].result()

    def log_once():   # one metrics line (the step of the last line written: no cadence wait)
        replica.records.log(tc.steps, [0.0] * 4, tc.lr)

    parts = {"batch": timed(lambda: replica.load(trainer.k), 20, device),
             "ema": timed(lambda: replica.ema.update(replica.net), 20, device),
             "log": timed(log_once, 5, device) / tc.log_every}
    trainer.close()
    shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = statistics.median(s / b for s, b in zip(times["stage"], times["bare"]))
    print(f"tier {cfg.tier}, device {device}, model {cfg.run_id.rsplit('-', 1)[0]}, batch {tc.batch}, "
          f"{args.rounds} rounds x {args.steps} steps, {args.threads} threads")
    print(f"bare objective step {1000 * med['bare']:.2f} ms, stage step {1000 * med['stage']:.2f} ms")
    print("stage parts per step: " + ", ".join(f"{k} {1000 * v:.3f} ms" for k, v in parts.items()))
    print(f"stage / bare: {med['stage'] / med['bare']:.3f} (median of per-round ratios {per_round:.3f}; target <= 1.1)")


if __name__ == "__main__":
    main()
