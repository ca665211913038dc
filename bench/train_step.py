"""Train-step time and peak memory: MeanFlow against Flow Matching (ratio 0) on the same small DiT
and batches, for both jvp strategies and the generic (func, forward_ad) and explicit tangents. The step
timed is meanflow.training.step.step, the one the train stage runs (forward, backward, the loss check's host sync,
update, EMA). Times are interleaved in one process (medians of rounds);
peak memory is measured per variant in a fresh subprocess (CUDA: max_memory_allocated; CPU:
peak RSS above the RSS just before the first step). Prints ratios against Flow Matching and a
per-part breakdown of the step (gradient forward, tangent = the jvp call, backward, rest).

    python bench/train_step.py [--rounds 7] [--steps 5] [--batch 16 64] [--device cpu] [--compile]
(time/FM and mem/FM of a compiled variant are against fm_compiled.)
Targets (issue 18): MeanFlow/FM step time <= 1.15 at batch 64 (<= 1.3 at 16), peak memory <= 1.1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from meanflow import config  # noqa: E402
from meanflow.models import build_model  # noqa: E402
from meanflow.models import tangent as explicit_tangent  # noqa: E402
from meanflow.objective import MeanFlow  # noqa: E402
from meanflow.objective import meanflow as mf_objective  # noqa: E402
from meanflow.runtime import device as select_device  # noqa: E402
from meanflow.training.step import EMA, make_optimizer, step  # noqa: E402

VARIANTS = {"fm": {"ratio": 0.0}}  # Flow Matching: ratio 0, no jvp
VARIANTS.update({f"mf_{s}_{a}": {"ratio": 0.25, "strategy": s, "jvp_api": a}
                 for s in ("joint", "split") for a in ("func", "forward_ad", "explicit")})
# --compile: train.compile's path (the gradient forward compiled; the explicit one pass compiled)
COMPILED = {"fm_compiled": {"ratio": 0.0}, "mf_explicit_compiled": {"ratio": 0.25, "jvp_api": "explicit"}}


def setup(args, variant):
    cfg = config.build({
        "data": {"channels": 4, "input_size": args.size, "num_classes": 10},
        "model": {"name": "custom", "depth": args.depth, "hidden": args.hidden, "heads": args.heads, "patch": args.patch},
        "meanflow": {**{**VARIANTS, **COMPILED}[variant], "omega": 1.0},
        "train": {"lr": 1e-4},
    })
    device = select_device(args.device)
    torch.manual_seed(0)
    net = build_model(cfg).to(device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(args.batch, 4, args.size, args.size, device=device, generator=g)
    y = torch.randint(0, 10, (args.batch,), device=device, generator=g)
    obj, grad_net = MeanFlow(cfg.meanflow, 10), None
    if variant in COMPILED:
        grad_net = torch.compile(net).__call__
        obj.compile_tangent()
    return net, (make_optimizer(net, cfg.train), EMA(net, 0.9999)), obj, x, y, g, grad_net, device


def timed(state, steps):
    net, (opt, ema), obj, x, y, g, grad_net, device = state
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(obj, net, opt, x, y, ema=ema, generator=g, grad_net=grad_net)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def timed_parts(state, steps):
    """Seconds per step of each part of step.step: the gradient forward, the tangent (the jvp
    call; under split also its primal, under joint the r != t rows' gradient forward; for explicit,
    the one gradient forward that carries the r != t rows' tangent), the backward and the rest
    (sampling, loss, host sync, optimiser, EMA). Parts are clocked by wrapping and forward hooks, not
    re-implemented; a part inside another counts once, in the outer one."""
    net, (opt, ema), obj, x, y, g, grad_net, device = state
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    acc, open_ = defaultdict(float), []

    def start(part):
        open_.append((part, None))
        if len(open_) == 1:
            sync()
            open_[-1] = (part, time.perf_counter())

    def stop():
        part, t0 = open_.pop()
        if t0 is not None:
            sync()
            acc[part] += time.perf_counter() - t0

    def clocked(part, fn):
        def run(*a, **k):
            start(part)
            try:
                return fn(*a, **k)
            finally:
                stop()
        return run

    jvp, dit_jvp, backward = mf_objective.jvp, explicit_tangent.dit_jvp, torch.Tensor.backward
    mf_objective.jvp, explicit_tangent.dit_jvp = clocked("tangent", jvp), clocked("tangent", dit_jvp)
    torch.Tensor.backward = clocked("backward", backward)
    compiled_jvp = obj.dit_jvp
    if compiled_jvp is not None:
        obj.dit_jvp = clocked("tangent", compiled_jvp)
    hooks = []
    if grad_net is None:  # the bare net's forwards (hooks keep `grad_net is net` for the one-pass path)
        hooks = [net.register_forward_pre_hook(lambda *_: start("forward")), net.register_forward_hook(lambda *_: stop())]
    else:  # compiled: the call is the forward
        grad_net = clocked("forward", grad_net)
    try:
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            step(obj, net, opt, x, y, ema=ema, generator=g, grad_net=grad_net)
            sync()
            acc["total"] += time.perf_counter() - t0
    finally:
        mf_objective.jvp, explicit_tangent.dit_jvp, torch.Tensor.backward = jvp, dit_jvp, backward
        obj.dit_jvp = compiled_jvp
        for h in hooks:
            h.remove()
    acc["rest"] = acc["total"] - acc["forward"] - acc["tangent"] - acc["backward"]
    return {k: v / steps for k, v in acc.items()}


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def peak_memory_child(args, variant):
    """Runs in a subprocess: bytes of peak memory of `steps` train steps."""
    state = setup(args, variant)
    device = state[-1]
    timed(state, 1)  # the optimiser's state exists from here on, for every variant alike
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        timed(state, 2)
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    base = rss_kib()
    timed(state, 2)
    return (rss_kib("VmHWM") - base) * 1024


def bench(args):
    """Interleaved medians of step time and per-part time, peak memory per variant, one batch size."""
    variants = list(VARIANTS) + (list(COMPILED) if args.compile else [])
    states = {v: setup(args, v) for v in variants}
    for s in states.values():
        timed(s, 2)  # warm-up
    times, parts = {v: [] for v in variants}, {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved so that machine noise hits every variant alike
        for v, s in states.items():
            times[v].append(timed(s, args.steps))
        for v, s in states.items():
            parts[v].append(timed_parts(s, 2))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    part = {v: {k: statistics.median(p[k] for p in ps) for k in ps[0]} for v, ps in parts.items()}

    argv = [f"--{k}={getattr(args, k)}" for k in ("batch", "size", "hidden", "depth", "heads", "patch", "threads")]
    argv += [f"--device={args.device}"] if args.device else []
    mem = {}
    for v in variants:
        # glibc keeps freed blocks for reuse, which hides peaks from RSS; mmap-backed allocations
        # return to the OS at once, so the child's peak RSS tracks live tensors
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run([sys.executable, __file__, *argv, "--memory-child", v],
                             capture_output=True, text=True, check=True, env=env)
        mem[v] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"\ndevice {states['fm'][-1]}, DiT depth {args.depth} hidden {args.hidden}, "
          f"{(args.size // args.patch) ** 2} tokens, batch {args.batch}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':<22} {'ms/step':>9} {'time/FM':>8} {'peak MiB':>9} {'mem/FM':>7} |"
          f" {'fwd':>6} {'tangent':>7} {'fwd+tan':>7} {'bwd':>6} {'rest':>6} (ms, median of part-timed steps)")
    for v in variants:
        fm = "fm_compiled" if v in COMPILED else "fm"
        p = {k: 1000 * part[v][k] for k in ("forward", "tangent", "backward", "rest")}
        print(f"{v:<22} {1000 * med[v]:9.1f} {med[v] / med[fm]:8.2f} {mem[v] / 2**20:9.1f} {mem[v] / mem[fm]:7.2f} |"
              f" {p['forward']:6.1f} {p['tangent']:7.1f} {p['forward'] + p['tangent']:7.1f} {p['backward']:6.1f} {p['rest']:6.1f}")
    best = min((v for v in VARIANTS if v != "fm"), key=med.get)
    target = 1.15 if args.batch >= 64 else 1.3
    print(f"fastest MeanFlow variant at ratio 0.25: {best} (time ratio {med[best] / med['fm']:.2f}, "
          f"target <= {target}; memory ratio {mem[best] / mem['fm']:.2f}, target <= 1.1)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    # batch 64: the step is compute-bound on CPU; at 16 the jvp of its 4 r != t rows is bound by
    # per-op dispatch (about a full forward's worth), which the paper's per-device batches never see
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--size", type=int, default=16, help="input size (tokens = (size/patch)^2)")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also train.compile's path (fm_compiled, mf_explicit_compiled)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        args.batch = args.batch[0]
        print(json.dumps(peak_memory_child(args, args.memory_child)))
        return

    batches = args.batch
    for b in batches:
        args.batch = b
        bench(args)


if __name__ == "__main__":
    main()
