"""What only a CUDA device can show (`pytest -m cuda`, run by bench/gpu_check.py): the jvp
attention against fp64 on CPU, the fused SDPA kernels taken where no tangent flows, a bf16
MeanFlow step, a training step under each train.precision, torch.compile on and off equal, and
Inception features on CUDA equal to CPU. Every test is skipped, saying so, where torch sees no
CUDA device."""
import numpy as np
import pytest
import torch

from meanflow import config
from meanflow.models import build_model
from meanflow.models.attention import attention, math_attention
from meanflow.objective import MeanFlow

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]


def qkv(dtype, device, seed=0, shape=(2, 4, 64, 32)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(6)]


def test_jvp_attention_on_cuda_matches_fp64_on_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = torch.func.jvp(math_attention, tuple(qkv(torch.float64, "cpu")[:3]), tuple(qkv(torch.float64, "cpu")[3:]))
    q, k, v, dq, dk, dv = qkv(torch.float32, "cuda")
    out, tan = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    for a, b in ((out, ref[0]), (tan, ref[1])):
        err = (a.double().cpu() - b).norm() / b.norm()
        assert err < 1e-5, err


def test_fused_kernels_where_no_tangent_flows():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, dq, dk, dv = qkv(torch.bfloat16, "cuda")
    ref = math_attention(q.float(), k.float(), v.float())
    # math is not allowed here: the plain call and the jvp's primal must take a fused kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        plain = attention(q, k, v)
        primal, _ = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    assert (plain.float() - ref).abs().max() < 2e-2
    assert torch.equal(primal, plain)


def small_cfg(**mf):
    return config.build({"data": {"channels": 4, "input_size": 16, "num_classes": 10},
                         "model": {"name": "custom", "depth": 2, "hidden": 128, "heads": 4, "patch": 2},
                         "meanflow": {"ratio": 0.25, "omega": 2.0, **mf}})


def random_net(cfg):
    """The backbone with every weight random (adaLN-Zero's zero init makes a fresh DiT output 0)."""
    torch.manual_seed(0)
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net.cuda()


def batch(device, n=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def loss_on(net, cfg, device, autocast: bool):
    obj = MeanFlow(cfg.meanflow, 10)
    x, y = batch(device)
    g = torch.Generator(device).manual_seed(3)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        return obj(net, x, y, generator=g)


def test_bf16_step_is_close_to_fp32():
    cfg = small_cfg()
    net = random_net(cfg)
    bf16 = loss_on(net, cfg, "cuda", True)
    fp32 = loss_on(net, cfg, "cuda", False)
    assert torch.isfinite(bf16.loss)
    bf16.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert abs(bf16.loss_unweighted.item() - fp32.loss_unweighted.item()) / fp32.loss_unweighted.item() < 0.05


def test_training_step_under_each_precision():
    """train.precision through the training step itself: each value steps to finite weights, and
    bf16 (autocast on) and tf32 give the fp32 loss within a loose tolerance."""
    from meanflow import runtime
    from meanflow.training.records import METRICS
    from meanflow.training.step import make_optimizer, step
    cfg, losses = small_cfg(), {}
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for p in runtime.PRECISIONS:
            net, (x, y) = random_net(cfg), batch("cuda")   # the same weights and batch each time
            assert runtime.use_precision(x.device, p) == p
            vals, _ = step(MeanFlow(cfg.meanflow, 10), net, make_optimizer(net, cfg.train), x, y,
                           generator=torch.Generator("cuda").manual_seed(3), precision=p)
            losses[p] = vals[0][METRICS.index("loss_unweighted")]
            assert all(torch.isfinite(q).all() for q in net.parameters()), p
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert losses["bf16"] != losses["fp32"], "bf16 autocast took no effect"
    for p in ("bf16", "tf32"):
        assert abs(losses[p] - losses["fp32"]) / losses["fp32"] < 0.05, losses


def test_compile_on_and_off_equal():
    cfg = small_cfg()
    net = random_net(cfg)
    x, y = batch("cuda")
    t = torch.rand(len(x), device="cuda")
    eager = net(x, t, t * 0.5, y)
    compiled = torch.compile(net)(x, t, t * 0.5, y)
    assert (compiled - eager).abs().max() / eager.abs().max() < 1e-4
    # the training step compiles the gradient-carrying forward only (train.compile)
    obj = MeanFlow(cfg.meanflow, 10)
    losses = []
    for grad_net in (net, torch.compile(net)):
        g = torch.Generator("cuda").manual_seed(3)
        losses.append(obj(net, x, y, generator=g, grad_net=grad_net).loss_unweighted.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_inception_fid_on_cuda_equals_cpu(tmp_path):
    """The fid stage's own path (extract under exact_fp32, torch-fidelity's Frechet distance in
    float64) on the same uint8 images: CUDA and CPU agree to 1e-3."""
    from meanflow.rehearsal import random_inception
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from meanflow.metrics import fid
    weights = random_inception(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (48, 64, 64, 3), dtype=np.uint8) for _ in range(2))
    out = {}
    for dev in ("cpu", "cuda"):
        fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(weights)).to(dev).eval()
        with fid.exact_fp32():
            ma, _ = fid.extract(fe, [a], 16, dev)
            mb, _ = fid.extract(fe, [b], 16, dev)
        out[dev] = fid.frechet(ma.mean, ma.sigma, mb.mean, mb.sigma)
    assert abs(out["cuda"] - out["cpu"]) <= 1e-3 * max(1.0, out["cpu"]), out


NCCL_SCRIPT = '''
import torch, torch.distributed as dist
from meanflow.training import distributed
d = distributed.init_distributed("cuda")  # the device torchrun's LOCAL_RANK names
# one rank: the training makes no group (nothing to reduce); make the NCCL one it would make with more
dist.init_process_group("nccl", device_id=d.device)
assert dist.get_backend() == "nccl", dist.get_backend()
net = torch.nn.Linear(8, 4).to(d.device)
avg = distributed.GradAverager(net.parameters(), d.world)
net(torch.ones(2, 8, device=d.device)).sum().backward()
before = net.weight.grad.clone()
avg.average()
assert torch.equal(net.weight.grad, before), "1 rank: the average is the rank's own gradient"
dist.destroy_process_group()
print("nccl ok")
'''


def test_nccl_torchrun_one_gpu(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "nccl.py"
    script.write_text(NCCL_SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        str(script)], cwd=config.ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "nccl ok" in p.stdout, p.stdout + p.stderr
