"""The paper's networks at their real size, rehearsed on the CPU before a GPU allocation is spent:
each one trains two steps with its configured jvp path (fp32, and bf16 autocast against it),
checkpoints, resumes equal to the uninterrupted run, samples at 1 and 2 NFEs through a full-size
sd-vae decoder and scores the images with the FID stage's Inception; its memory is measured
against the model of meanflow.costs. Weights are random: the VAE and Inception are stand-ins with
the real architectures (no network is reached), the store is a few random records.

    rehearse(tier, experiment, stand_ins(root), work) -> one network's figures (a dict)

bench/fullsize.py runs every network (NETWORKS) and prints the table; tests/test_fullsize.py runs
the smallest. Peak RSS is read from /proc (VmHWM, reset between phases), so run one network per
process with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so freed tensors leave RSS."""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config, costs, layout, runtime
from .data import vae as vaemod
from .data.store import LABELS, record_dtype
from .objective.jvp import api_taken
from .shards import MANIFEST

log = logging.getLogger(__name__)

# (tier, experiment): each distinct network of the imagenet and cifar10 tiers, in its table's row
NETWORKS = (("imagenet", "ratio_25"), ("imagenet", "MF-B/2"), ("imagenet", "MF-M/2"), ("imagenet", "MF-L/2"),
            ("imagenet", "MF-XL/2"), ("imagenet", "iMF-B/2"), ("imagenet", "iMF-M/2"), ("imagenet", "iMF-L/2"),
            ("imagenet", "iMF-XL/2"), ("cifar10", "MF-CIFAR10"))
RECORDS = 8            # store records per tier
# bf16 autocast against fp32 on the same weights and draws: the loss, and the gradient's direction
BF16_LOSS_RTOL, BF16_GRAD_COS = 0.05, 0.95


# --------------------------------------------------------------------------- stand-ins
def random_inception(path: Path) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3 architecture with random weights: built with
    its weight loading short-circuited, re-initialised He-normal (torch's default init makes pool3
    vanish to ~1e-8 through its ~95 layers: every image the same features, every FID equal), the
    state dict saved (data.inception_weights, torch-fidelity's feature_extractor_weights_path)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi
    orig_url, orig_load = fi.load_state_dict_from_url, fi.FeatureExtractorInceptionV3.load_state_dict
    fi.load_state_dict_from_url = lambda *a, **k: None
    fi.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fi.load_state_dict_from_url, fi.FeatureExtractorInceptionV3.load_state_dict = orig_url, orig_load
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5, generator=g)
    torch.save(net.state_dict(), path)
    return path


def fake_store(path: Path, kind: str, shape: tuple, num_classes: int, n: int = RECORDS, seed: int = 0) -> Path:
    """An encoded store of n random records in the encode stage's format (one shard)."""
    rng = np.random.default_rng(seed)
    rec = np.zeros(n, record_dtype(kind, shape))
    rec["index"], rec["label"] = np.arange(n), rng.integers(0, num_classes, n)
    if kind == "latent":
        rec["mean"], rec["std"] = rng.standard_normal(rec["mean"].shape), 0.1
    else:
        rec["x"] = rng.uniform(-1, 1, rec["x"].shape)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "shard-00000.npy", rec)
    np.save(path / LABELS, rec["label"])
    body = {"kind": kind, "shape": list(shape), "count": n, "num_classes": num_classes,
            "latent_scale": 0.18215 if kind == "latent" else None, "shards": [{"file": "shard-00000.npy", "count": n}]}
    (path / MANIFEST).write_text(json.dumps(body))
    return path


@dataclass(frozen=True)
class StandIns:
    data_root: Path      # data/<tier>/store for the imagenet (latent) and cifar10 (pixel) tiers
    vae: Path            # sd-vae-ft-mse's architecture, random weights
    inception: Path      # torch-fidelity's Inception-v3, random weights
    reference: Path      # random (mu, sigma) in its 2048 features


def stand_ins(root: Path) -> StandIns:
    """The stand-ins every network shares, made once under root (reused when present)."""
    root.mkdir(parents=True, exist_ok=True)
    done = root / "done"
    s = StandIns(root / "data", root / "vae", root / "inception.pth", root / "reference.npz")
    if done.exists():
        return s
    for tier, kind, shape, classes in (("imagenet", "latent", (4, 32, 32), 1000), ("cifar10", "pixel", (3, 32, 32), 10)):
        fake_store(layout.data(tier, s.data_root).store, kind, shape, classes)
    vaemod.random_vae(s.vae)
    random_inception(s.inception)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048)) / 64
    np.savez(s.reference, mu=rng.standard_normal(2048), sigma=a @ a.T)
    done.touch()
    return s


def rehearsal_config(tier: str, experiment: str, s: StandIns, runs: Path, batch: int, params: dict | None = None):
    """The row's config with the stand-ins, `batch` examples, 2 steps, and sampling of `batch`
    images (random labels: a balanced set needs a multiple of the classes) scored against s.reference."""
    base = config.resolve(params or config.load_params(), tier, experiment)
    over = {"data": {"root": str(s.data_root), "inception_weights": str(s.inception), "device": "cpu",
                     **({"vae": str(s.vae), "vae_revision": None} if base.data.vae else {})},
            "train": {"steps": 2, "batch": batch, "ckpt_every": 2, "keep_ckpts": 1, "keep_ckpts_done": 1,
                      "log_every": 1, "device": "cpu", "runs_root": str(runs), "accum": 1},
            "sample": {"n": batch, "batch": batch, "shard_size": batch, "labels": "random", "reference": "npz",
                       "reference_npz": str(s.reference), "device": "cpu"}}
    return config.build(config.deep_merge(base.raw, over), tier, experiment, f"rehearsal {tier}/{experiment}", name=base.name)


# --------------------------------------------------------------------------- measuring
def rss(field: str = "VmRSS") -> int:
    """This process's resident (VmRSS) or peak resident (VmHWM) bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak():
    """VmHWM := VmRSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def tensors_sha256(path: Path) -> str:
    """sha256 over a safetensors file's tensors (names, dtypes, shapes, bytes), one tensor at a time."""
    from safetensors import safe_open
    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            h.update(f"{k} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def same_optimizer(a: Path, b: Path) -> bool:
    """Adam's state of two checkpoints' state.pt, equal bitwise (memory-mapped)."""
    sa = torch.load(a, weights_only=True, mmap=True)["optimizer"]["state"]
    sb = torch.load(b, weights_only=True, mmap=True)["optimizer"]["state"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- the phases
def _batch(rep, k: int, batch: int, autocast_dtype=None):
    """(step k's batch of `batch` examples with its draws, the autocast context: bf16 or off)."""
    from .training.batches import load_batch
    tc, d = rep.cfg.train, rep.cfg.data
    b = load_batch(rep.store, rep.sampler, rep.objective, k, batch, 0, 1, tc.seed, rep.device,
                   conditional=d.num_classes > 0, augment=d.augment)
    return b, runtime.autocast_to("cpu", autocast_dtype)


def _steps(rep, ks, batch: int, autocast_dtype=None) -> tuple[list[float], float]:
    """Training steps ks of the replica at `batch` examples (its own draws); (squared errors, the
    fastest step's seconds after the first)."""
    from .training.step import step
    losses, dts = [], []
    for k in ks:
        b, ac = _batch(rep, k, batch, autocast_dtype)
        t0 = time.perf_counter()
        with ac:
            vals, _ = step(rep.objective, rep.net, rep.opt, b.x, b.y, ema=rep.ema, grad_net=rep.fwd, draws=b.draws(),
                           precision="fp32")
        dts.append(time.perf_counter() - t0)
        losses.append(vals[0][1])   # the squared error: the adaptive loss is ~1 by construction
    return losses, min(dts[1:] or dts)


def _gradient(rep, batch: int, k: int, autocast_dtype=None) -> tuple[float, list[torch.Tensor]]:
    """(squared error, the loss's gradient per parameter) at the replica's current weights on step
    k's draws, no update."""
    b, ac = _batch(rep, k, batch, autocast_dtype)
    rep.opt.zero_grad(set_to_none=True)
    with ac:
        out = rep.objective(rep.net, b.x, b.y, grad_net=rep.fwd, **b.draws())
    out.loss.backward()
    g = [p.grad for p in rep.net.parameters() if p.grad is not None]
    rep.opt.zero_grad(set_to_none=True)   # the grads stay ours alone
    return out.loss_unweighted.item(), g


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(cosine, norm ratio |b| / |a|) of two gradients given per parameter, in float64 one tensor at a
    time (a flat float64 copy of an XL/2's gradient alone is 5 GB)."""
    ab = aa = bb = 0.0
    for x, y in zip(a, b):
        x, y = x.double(), y.double()
        ab, aa, bb = ab + float(x.flatten() @ y.flatten()), aa + float(x.flatten() @ x.flatten()), bb + float(y.flatten() @ y.flatten())
    return ab / math.sqrt(aa * bb), math.sqrt(bb / aa)


def memory_and_speed(cfg, big: int | None = None) -> dict:
    """Peak RSS of two steps at train.batch and at a `big` batch (default: where activations
    outweigh the gradients, so the slope shows, or what fits) against costs.Memory; s/step; bf16
    against fp32."""
    from .training.distributed import Dist
    from .training.loop import Replica
    rep = Replica(cfg, Dist(0, 1, torch.device("cpu")))
    mem = costs.train_memory(cfg, rep.net)
    # what the process holds beyond the weights and the EMA before training (interpreter, libraries,
    # the store, allocator caches): not modelled, as a GPU's memory holds none of it
    base = rss() - mem.params * (costs.WEIGHT + costs.EMA_COPY)
    b1 = cfg.train.batch
    if big is None:   # where activations outweigh the freed gradients twice, within 80% of the memory left
        room = 0.8 * runtime.device_memory("cpu") + rss() - base
        big = max(2 * b1, 2 ** math.ceil(math.log2(max(2 * mem.params * costs.GRAD / mem.activations, 1))))
        while big > b1 and mem.peak(big, persistent_grads=False) > room:
            big -= 1
        big = big if big > b1 else 1   # no room above: the second batch below
    out = {"overhead": base, "params": mem.params, "state_bytes": mem.state, "act_bytes": mem.activations,
           "act_bytes_rows": [mem.fm_row, mem.jvp_row], "jvp_api": api_taken(rep.net, cfg.meanflow.jvp_api)}
    for key, b, ks in (("small", b1, (0, 1, 2)), ("big", big, (3, 4))):
        reset_peak()
        losses, dt = _steps(rep, ks, b)
        out[key] = {"batch": b, "peak": rss("VmHWM") - base, "model": mem.peak(b, persistent_grads=False),
                    "s_per_step": dt, "losses": losses}
    # bf16 autocast on the CPU against fp32: one loss and gradient on the same weights and draws
    l32, g32 = _gradient(rep, b1, 5)
    l16, g16 = _gradient(rep, b1, 5, torch.bfloat16)
    cos, ratio = _cosine(g32, g16)
    out["bf16"] = {"loss_fp32": l32, "loss_bf16": l16, "loss_rel": abs(l16 - l32) / abs(l32), "grad_cos": cos,
                   "grad_norm_ratio": ratio}
    del g32, g16
    losses, dt = _steps(rep, (6, 7, 8), b1, torch.bfloat16)
    out["bf16"].update(losses=losses, s_per_step=dt, finite=all(math.isfinite(v) for v in losses))
    return out


def train_and_resume(cfg_u, cfg_p) -> dict:
    """Two steps uninterrupted (cfg_u) against one step, a SIGTERM checkpoint and a resumed second
    (cfg_p, another runs_root): bitwise equal weights, EMA and Adam state."""
    from .training.checkpoint import checkpoints
    from .training.distributed import Dist
    from .training.loop import Loop, Preempted, Replica, train
    t0 = time.perf_counter()
    train(cfg_u, progress=False)
    seconds = time.perf_counter() - t0
    loop = Loop(Replica(cfg_p, Dist(0, 1, torch.device("cpu"))), progress=False)
    loop.open()
    try:
        loop.advance(stop_requested=True, signum=signal.SIGTERM)
        raise AssertionError("no pre-emption")
    except Preempted as e:
        stopped = e.step
    finally:
        loop.close()
    del loop
    gc.collect()   # the pre-empted replica's net, EMA and Adam state, before the resumed run builds its own
    train(cfg_p, progress=False)
    (su, cu), (sp, cp) = checkpoints(cfg_u.run_dir)[-1], checkpoints(cfg_p.run_dir)[-1]
    same = {f: tensors_sha256(cu / f) == tensors_sha256(cp / f) for f in ("model.safetensors", "ema.safetensors")}
    same["final ema"] = tensors_sha256(layout.run(cfg_u).ema) == tensors_sha256(layout.run(cfg_p).ema)
    same["adam"] = same_optimizer(cu / "state.pt", cp / "state.pt")
    return {"train_seconds": seconds, "stopped_at": stopped, "steps": (su, sp), "resume_equal": same,
            "checkpoint_bytes": dir_bytes(cu)}


def sample_and_score(cfg) -> dict:
    """The sample stage at every NFE through the decoder, then the FID stage on the images."""
    from .generate import generate, sample_dir
    from .metrics.fid import evaluate_all
    t0 = time.perf_counter()
    generate(cfg, progress=False)
    t1 = time.perf_counter()
    metrics = evaluate_all(cfg, progress=False)
    t2 = time.perf_counter()
    shapes = {}
    for k in cfg.sample.nfe:
        with np.load(next(sample_dir(cfg, k).glob("*.npz"))) as z:
            shapes[k] = list(z["arr_0"].shape)
    vals = {k: json.loads(Path(m).read_text()) for k, m in zip(cfg.sample.nfe, metrics)}
    n = cfg.sample.n * len(cfg.sample.nfe)
    return {"sample_s_per_image": (t1 - t0) / n, "fid_s_per_image": (t2 - t1) / n, "images": shapes,
            "fid": {k: v.get("fid") for k, v in vals.items()}}


def rehearse(tier: str, experiment: str, s: StandIns, work: Path, batch: int = 2, big: int | None = None,
             params: dict | None = None) -> dict:
    """Every phase for one network; work/ is emptied of its checkpoints at the end."""
    cfg = lambda name: rehearsal_config(tier, experiment, s, work / name, batch, params)  # noqa: E731
    out = {"network": cfg("u").model.name, "tier": tier, "experiment": experiment, "rss_after": {}}
    for phase, run in (("memory", lambda: memory_and_speed(cfg("m"), big)),
                       ("train", lambda: train_and_resume(cfg("u"), cfg("p"))),
                       ("sample", lambda: sample_and_score(cfg("u")))):
        log.info("%s/%s: %s phase (RSS %.1f GiB)", tier, experiment, phase, rss() / 2**30)
        out.update(run())
        gc.collect()   # one phase's networks are gone before the next builds its own
        out["rss_after"][phase] = rss()
        shutil.rmtree(work / "p", ignore_errors=True)
    shutil.rmtree(work / "m", ignore_errors=True)
    shutil.rmtree(work / "u", ignore_errors=True)
    return out
