"""Compute cost of the paper's runs: FLOPs counted by torch's flop counter on the meta device (no
memory, no time, exact shapes), combined into GPU-hours at a stated peak and utilisation.

A MeanFlow training example costs, with the default `split` strategy of meanflow.objective:

    F + B               the gradient-carrying forward and its backward, every row
    + ratio * J         the jvp (primal + tangent, no graph) on the r != t rows only
    + g * F             CFG targets: the current net without gradient (g = 0 without guidance,
                        1 for kappa = 0, 2 for kappa > 0: null and true class in one batch; iMF:
                        2, its v for the class and the null class, which is also the jvp tangent)

FlopCounterMode counts 2 FLOPs per multiply-add (DiT's tables count multiply-adds: its "GFLOPs"
are half of ours; tests/test_costs.py checks both against Table 2/4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .objective.base import fm_rows
from .runtime import autocast_to

IMAGENET_TRAIN = 1_281_167       # ILSVRC2012 train images (encoded once, with their flips)
H100_BF16_DENSE = 989e12         # H100 SXM peak bf16 tensor FLOP/s without sparsity
NODE_WEEK_GPU_HOURS = 8 * 24 * 7  # one 8-GPU node for a week
# The one published step time (paper / reference README): MF-B/4, batch 256, 0.052 s/iter in JAX
# on a TPU v4-8 (4 chips x 275 TFLOP/s bf16). With this module's count of that step it gives the
# utilisation the plan assumes by default (see reference_utilisation).
REFERENCE_STEP = {"seconds": 0.052, "batch": 256, "peak": 4 * 275e12}


def _count(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


@dataclass(frozen=True)
class NetFlops:
    forward: float    # one example, one forward
    backward: float   # its backward (parameters and input)
    jvp: float        # one no-grad jvp along (v, 0, 1): primal and tangent


def network_flops(net: torch.nn.Module, shape: tuple, num_classes: int) -> NetFlops:
    """Per-example FLOPs of a u(z, t, h, y) backbone built on the meta device."""
    z = torch.randn(1, *shape, device="meta")
    t = torch.full((1,), 0.5, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta") if num_classes else None
    fwd = _count(lambda: net(z, t, t * 0.5, y))
    both = _count(lambda: net(z, t, t * 0.5, y).sum().backward())

    def jvp():
        with torch.no_grad():
            torch.func.jvp(lambda z_, t_: net(z_, t_, t_ * 0.5, y), (z, t), (torch.randn_like(z), torch.ones_like(t)))
    return NetFlops(fwd, both - fwd, _count(jvp))


def guidance_forwards(mf, num_classes: int) -> int:
    """Extra no-grad forwards per example for the CFG target (see MeanFlow.guided_velocity; iMF's
    IMF.guidance always runs the network's v: class and null class, or once unconditional)."""
    if getattr(mf, "objective", "meanflow") == "imf":
        return 2 if num_classes else 1
    if num_classes == 0 or (mf.omega == 1.0 and mf.kappa == 0.0):
        return 0
    return 2 if mf.kappa > 0 else 1


def train_example_flops(nf: NetFlops, mf, num_classes: int) -> float:
    return nf.forward + nf.backward + mf.ratio * nf.jvp + guidance_forwards(mf, num_classes) * nf.forward


def vae_flops(resolution: int = 256) -> tuple[float, float]:
    """(encode, decode) FLOPs per image of sd-vae-ft-mse's architecture (AutoencoderKL)."""
    from diffusers import AutoencoderKL
    from .data.vae import SD_VAE
    with torch.device("meta"):
        vae = AutoencoderKL(**{**SD_VAE, "sample_size": resolution})
    x = torch.randn(1, 3, resolution, resolution, device="meta")
    lat = torch.randn(1, 4, resolution // 8, resolution // 8, device="meta")
    return _count(lambda: vae.encode(x)), _count(lambda: vae.decode(lat))


def inception_flops() -> float:
    """Inception-v3 at 299x299 (the architecture torch-fidelity's inception-v3-compat ports)."""
    import torchvision
    with torch.device("meta"):
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    return _count(lambda: net(torch.randn(1, 3, 299, 299, device="meta")))


@dataclass(frozen=True)
class RunCost:
    run_id: str
    experiment: str
    params_m: float
    forward_gflops: float        # per example
    train_flops: float           # steps * batch * per-example step
    sample_flops: float          # every NFE of sample.nfe, n images each, with VAE decode
    fid_flops: float             # Inception on every sample set

    @property
    def total(self) -> float:
        return self.train_flops + self.sample_flops + self.fid_flops


def backbone_flops(cfg) -> tuple[NetFlops, float]:
    """(per-example FLOPs, parameters in millions) of the backbone a resolved Config names."""
    from meanflow.models import build_model
    d = cfg.data
    with torch.device("meta"):
        net = build_model(cfg)
    nf = network_flops(net, (d.channels, d.input_size, d.input_size), d.num_classes)
    return nf, sum(p.numel() for p in net.parameters()) / 1e6


def run_cost(cfg, vae_decode: float, inception: float, backbone=None) -> RunCost:
    """The cost of one run (a resolved Config): training, sampling every NFE and FID of each.
    `backbone`: its (NetFlops, params) when already counted (runs differing only in the objective)."""
    d = cfg.data
    nf, params = backbone or backbone_flops(cfg)
    train = cfg.train.steps * cfg.train.batch * train_example_flops(nf, cfg.meanflow, d.num_classes)
    decode = vae_decode if d.vae else 0.0
    sample = sum(cfg.sample.n * (k * nf.forward + decode) for k in cfg.sample.nfe)
    fid = len(cfg.sample.nfe) * cfg.sample.n * inception
    return RunCost(cfg.run_id, cfg.experiment or "", params, nf.forward / 1e9, train, sample, fid)


def reference_utilisation(b4_example_flops: float) -> float:
    """Model-FLOP utilisation of the paper's own MF-B/4 step (REFERENCE_STEP) by our FLOP count."""
    ref = REFERENCE_STEP
    return b4_example_flops * ref["batch"] / ref["seconds"] / ref["peak"]


def gpu_hours(flops: float, peak: float = H100_BF16_DENSE, utilisation: float = 0.4) -> float:
    return flops / (peak * utilisation) / 3600


# --------------------------------------------------------------------------- memory
# Per parameter, fp32: the weights, their gradients, Adam's two moments and the one EMA copy.
WEIGHT, GRAD, ADAM, EMA_COPY = 4, 4, 8, 4
GPU_RESERVE = 2 * 2**30   # per GPU beyond what is modelled: CUDA context, cuBLAS/cuDNN workspaces, fragmentation


@dataclass(frozen=True)
class Memory:
    """Training memory of one process: fixed state plus activations linear in the micro-batch.

    The saved graph is what backward keeps alive; its size per example (rows that take the jvp,
    rows with r = t) and its fixed part (bf16 autocast's weight copies) come from counting the
    tensors autograd saves (`count_saved`). The jvp and the CFG target run without gradient
    (meanflow.strategy split), so a jvp row saves what an r = t row saves; under joint they differ,
    and a batch's rows are counted as the front layout draws them (`saved`). Peak of a step:
      persistent gradients (the trainer's flat buffer when world > 1; accumulation):
          state + saved(b)
      one process (gradients set to None at each step, freed before the forward):
          state - grads + max(grads, saved(b))
    as backward frees the graph while it writes the gradients. Not modelled: the process's own
    memory (CUDA context, workspaces, fragmentation: GPU_RESERVE on a GPU)."""
    params: int
    fm_row: float          # bytes saved per example with r = t
    jvp_row: float         # bytes saved per example with r < t (the jvp's rows)
    ratio: float           # meanflow.ratio: the share of jvp rows
    fixed: float = 0.0     # saved bytes independent of the batch (bf16 weight copies)

    @property
    def activations(self) -> float:
        """Saved bytes per example, rows mixed at `ratio` (planning at large batches)."""
        return self.ratio * self.jvp_row + (1 - self.ratio) * self.fm_row

    @property
    def state(self) -> float:
        return self.params * (WEIGHT + GRAD + ADAM + EMA_COPY)

    def saved(self, batch: int) -> float:
        """Saved bytes of a batch: its r = t and jvp rows counted as the front layout draws them
        (objective.base.fm_rows: batch 2 at ratio 0.75 has 2 jvp rows, not 1.5)."""
        fm = fm_rows(batch, self.ratio)
        return self.fixed + fm * self.fm_row + (batch - fm) * self.jvp_row

    def peak(self, batch: int, persistent_grads: bool = True) -> float:
        act = self.saved(batch)
        if persistent_grads:
            return self.state + act
        return self.state - self.params * GRAD + max(self.params * GRAD, act)

    def largest_batch(self, capacity: float, persistent_grads: bool = True) -> int:
        """The most examples whose step fits `capacity` bytes (0: not even one)."""
        if not self.activations:
            return 0
        b = max(int((capacity - self.peak(0, persistent_grads)) // self.activations), 0) + 1
        while b > 0 and self.peak(b, persistent_grads) > capacity:   # the row counts' rounding: at most a row or two
            b -= 1
        return b


def count_saved(net, objective, batch: int, shape: tuple, num_classes: int, jvp: bool, autocast_dtype=None) -> int:
    """Bytes of the distinct storages autograd saves for backward in one loss evaluation on a
    random batch whose rows all take the jvp (r < t) or none do (r = t); parameters excluded (they
    are state). On the net's device."""
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            seen[s._cdata] = s.nbytes()
        return t.detach()   # not t: a saved output holding itself through its grad_fn would never be freed
    dev = next(net.parameters()).device
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(batch, *shape, generator=g, device=dev)
    y = torch.randint(0, num_classes, (batch,), generator=g, device=dev) if num_classes else None
    t = torch.full((batch,), 0.8, device=dev)
    ac = autocast_to(dev.type, autocast_dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda a: a), ac:
        out = objective(net, x, y, generator=g, t=t, r=t * 0.4 if jvp else t,
                        drop=torch.zeros(batch, dtype=torch.bool, device=dev))
    del out
    return sum(seen.values())


def train_memory(cfg, net=None, autocast_dtype=None, device="cpu") -> Memory:
    """The Memory of run `cfg` (resolved Config) on `net` (else one built on `device`): the saved
    graph of r = t rows and of jvp rows counted at batches 1 and 2 (`autocast_dtype`: bf16 models a
    GPU's train.precision bf16; the CPU's autocast casts the same matmuls and convolutions)."""
    from .models import build_model
    from .objective import build_objective
    d = cfg.data
    net = net if net is not None else build_model(cfg).to(device)
    shape, obj = (d.channels, d.input_size, d.input_size), build_objective(cfg.meanflow, d.num_classes)

    def rows(jvp: bool) -> tuple[float, float]:   # (per example, fixed)
        s1, s2 = (count_saved(net, obj, b, shape, d.num_classes, jvp, autocast_dtype) for b in (1, 2))
        return s2 - s1, max(2 * s1 - s2, 0)
    (a0, fixed), ratio = rows(False), cfg.meanflow.ratio
    return Memory(sum(p.numel() for p in net.parameters()), a0, rows(True)[0] if ratio else a0, ratio, fixed)


def pick_accum(cfg, per_rank_batch: int, capacity_bytes: float, net=None, world: int = 1,
               autocast_dtype=None, reserve: float = 0.0, memory: Memory | None = None) -> tuple[int, str]:
    """train.accum auto: the fewest micro-batches N (N divides the rank's batch) whose micro-batch
    fits `capacity_bytes` - `reserve` by the memory model; (N, why). When even one example does not
    fit, N = the rank's batch and the reason says so (the run will likely fail: a larger GPU or
    more of them)."""
    mem = memory or train_memory(cfg, net, autocast_dtype)
    persistent = world > 1   # DDP's flat gradient buffer; accumulation keeps gradients across micro-batches too
    room = capacity_bytes - reserve
    for n in (n for n in range(1, per_rank_batch + 1) if per_rank_batch % n == 0):
        need = mem.peak(per_rank_batch // n, persistent or n > 1)
        if need <= room:
            return n, (f"predicted peak {size(need)} of {size(room)} available (state {size(mem.state)}, "
                       f"{size(mem.activations)} per example)")
    need = mem.peak(1, True)
    return per_rank_batch, f"does not fit: one example needs {size(need)}, {size(room)} available"


def size(b: float) -> str:
    """Bytes for a log line: GiB, or MiB / KiB below one (the tiny tier's nets: not '0.0 GiB')."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b / 2**10:.1f} KiB"
