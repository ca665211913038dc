"""FLOP counts behind docs/gpu-plan.md: the backbones' forward cost against the paper's Table 2/4
GFLOPs (multiply-adds, half of torch's count), the step formula, and the plan's arithmetic."""
import pytest
import torch

from meanflow import config, costs
from meanflow.models import build_model


def imagenet(params, experiment=None):
    return config.resolve(params, "imagenet", experiment)


@pytest.fixture(scope="module")
def params():
    return config.load_params()


@pytest.mark.parametrize("exp,gflops", [(None, 5.6), ("MF-B/2", 23.1), ("MF-M/2", 54.0), ("MF-XL/2", 119.0)])
def test_forward_flops_match_the_paper(params, exp, gflops):
    nf, _ = costs.backbone_flops(imagenet(params, exp))
    assert nf.forward / 2e9 == pytest.approx(gflops, rel=0.03)


def test_l2_flops_resolve_the_papers_misprint(params):
    # Table 4 prints 119.0 for L/2 (XL/2's figure); depth 24 x width 1024 gives DiT-L/2's 80.7
    nf, _ = costs.backbone_flops(imagenet(params, "MF-L/2"))
    assert nf.forward / 2e9 == pytest.approx(80.7, rel=0.02)


def test_counts_on_meta_agree_with_a_real_forward():
    cfg = config.build({"data": {"channels": 4, "input_size": 8, "num_classes": 10},
                        "model": {"name": "custom", "depth": 2, "hidden": 64, "heads": 4, "patch": 2}})
    meta, _ = costs.backbone_flops(cfg)
    net = build_model(cfg)
    z, t, y = torch.randn(1, 4, 8, 8), torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)
    # the CPU flash kernel has no flop formula registered; its math decomposition is what runs on GPUs
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        real = costs._count(lambda: net(z, t, t * 0.5, y))
    assert meta.forward == real
    assert meta.backward > meta.forward          # input and weight gradients: about twice
    assert meta.jvp > meta.forward                # primal plus tangent


def test_step_formula(params):
    nf = costs.NetFlops(forward=10.0, backward=20.0, jvp=25.0)
    fm = imagenet(params, "ratio_0").meanflow
    assert costs.train_example_flops(nf, fm, 1000) == 30.0
    mf = imagenet(params).meanflow                                    # ratio 0.25, no CFG
    assert costs.train_example_flops(nf, mf, 1000) == 30.0 + 0.25 * 25.0
    cfg = imagenet(params, "omega_2p0").meanflow                        # kappa 0: one extra forward
    assert costs.train_example_flops(nf, cfg, 1000) == 30.0 + 0.25 * 25.0 + 10.0
    kap = imagenet(params, "kappa_0p5").meanflow                        # kappa > 0: null and true class
    assert costs.train_example_flops(nf, kap, 1000) == 30.0 + 0.25 * 25.0 + 20.0
    assert costs.train_example_flops(nf, kap, 0) == 30.0 + 0.25 * 25.0   # unconditional: no CFG
    imf = imagenet(params, "iMF-B/2").meanflow                            # v for class and null class
    assert costs.train_example_flops(nf, imf, 1000) == 30.0 + imf.ratio * 25.0 + 20.0


def test_gpu_hours_and_reference_utilisation():
    assert costs.gpu_hours(3600 * 1e15, peak=1e15, utilisation=1.0) == pytest.approx(1.0)
    assert costs.gpu_hours(3600 * 1e15, peak=1e15, utilisation=0.5) == pytest.approx(2.0)
    # a step that would take exactly 0.052 s at the reference peak is 100% utilisation
    full = costs.REFERENCE_STEP["seconds"] * costs.REFERENCE_STEP["peak"] / costs.REFERENCE_STEP["batch"]
    assert costs.reference_utilisation(full) == pytest.approx(1.0)


def test_plan_document(params, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_plan", config.ROOT / "bench" / "gpu_plan.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    small = {**params, "tables": {**params["tables"], "tiers": {"imagenet": ["1a"]}}}
    text = gp.build(small, "imagenet", util=0.5, peak=1e15, gpus=8, gpu_bytes=80e9)
    assert "| 1a | 4 |" in text and "at 50% model-FLOP utilisation" in text
    # memory: MF-B/4 at 256 / 8 = 32 examples per GPU, as the model predicts it
    cfg = imagenet(params, "ratio_0")
    mem = costs.train_memory(cfg, autocast_dtype=torch.bfloat16)
    row = text.split("## Memory per GPU")[1].split(f"| {cfg.run_id} | ratio_0 | 131.2 |")[1].splitlines()[0]
    need = (mem.peak(32) + costs.GPU_RESERVE) / 2**30
    assert f"| 32 | {need:.1f} | yes |" in row and row.endswith(f"| 1 | {131.2e6 * 16 / 1e9:.2f} | 3 | {131.2e6 * 52 / 1e9:.1f} |")
    # ratio 0 (Flow Matching) costs F + B per example, 400K steps x 256
    nf, _ = costs.backbone_flops(imagenet(params, "ratio_0"))
    fm_hours = costs.gpu_hours(400_000 * 256 * (nf.forward + nf.backward), 1e15, 0.5)
    fm_row = next(line for line in text.splitlines() if "| ratio_0 |" in line)
    assert f"| {fm_hours:,.1f} |" in fm_row


# --------------------------------------------------------------------------- memory
def tiny_dit(**meanflow):
    return config.build({"data": {"channels": 4, "input_size": 8, "num_classes": 10},
                         "model": {"name": "custom", "depth": 2, "hidden": 64, "heads": 4, "patch": 2},
                         "meanflow": {"ratio": 0.5, **meanflow}})


def test_saved_graph_is_linear_in_the_batch_and_the_jvp_saves_only_when_joint():
    cfg = tiny_dit()
    torch.manual_seed(0)
    net = build_model(cfg)
    from meanflow.objective import build_objective
    obj = build_objective(cfg.meanflow, 10)
    count = lambda b, jvp, o=obj: costs.count_saved(net, o, b, (4, 8, 8), 10, jvp)  # noqa: E731
    assert count(4, False) == 2 * count(2, False) and count(2, False) > 0   # fp32: no fixed part
    assert count(2, True) == count(2, False)        # split: the jvp runs without a graph
    joint = build_objective(tiny_dit(strategy="joint", jvp_api="forward_ad").meanflow, 10)
    assert count(2, True, joint) > 1.5 * count(2, False, joint)   # joint: the dual forward's graph too
    mem = costs.train_memory(cfg, net)
    assert mem.fm_row == mem.jvp_row == count(2, False) / 2 and mem.fixed == 0
    bf16 = costs.train_memory(cfg, net, autocast_dtype=torch.bfloat16)
    assert bf16.fixed > 0 and bf16.activations < mem.activations   # bf16 weight copies; half-size saved inputs


def test_saved_counts_the_rows_the_objective_draws():
    """A small batch's jvp rows as drawn (front layout), not the ratio's mean: batch 2 at ratio
    0.75 (the cifar recipe) has 2 jvp rows, and joint saves far more for them (the U-Net's -13%)."""
    from meanflow.objective import build_objective
    mem = costs.Memory(params=0, fm_row=1e8, jvp_row=6e8, ratio=0.75, fixed=5e7)
    for ratio, n in ((0.75, 2), (0.75, 4), (0.75, 5), (0.25, 3), (0.25, 32), (0.0, 8)):
        cfg = tiny_dit(ratio=ratio).meanflow
        t, r = build_objective(cfg, 10).sample_t_r(n, torch.Generator().manual_seed(0))
        jvp = int((t != r).sum())
        assert costs.Memory(0, 1e8, 6e8, ratio, 5e7).saved(n) == 5e7 + (n - jvp) * 1e8 + jvp * 6e8, (ratio, n)
    assert mem.saved(2) == 5e7 + 2 * 6e8 and mem.saved(4) == 5e7 + 4 * mem.activations   # 2 of 2; 3 of 4
    assert mem.largest_batch(mem.peak(2) + 5e8) == 2 and mem.largest_batch(mem.peak(4)) == 4


def test_peak_and_accumulation_pick():
    mem = costs.Memory(params=10**9, fm_row=1e8, jvp_row=2e8, ratio=0.5)        # 1.5e8 bytes per example
    assert mem.state == 20e9 and mem.activations == 1.5e8
    assert mem.peak(64) == 20e9 + 64 * 1.5e8
    assert mem.peak(10, persistent_grads=False) == 20e9                    # the freed gradients hold 10 examples
    assert mem.peak(64, persistent_grads=False) == 16e9 + 64 * 1.5e8
    assert mem.largest_batch(20e9 + 100 * 1.5e8 + 1) == 100
    cap = 20e9 + 64 * 1.5e8
    n, why = costs.pick_accum(None, 256, cap, world=8, memory=mem)
    assert n == 4 and "predicted peak" in why                              # 256 / 4 = 64 examples fit exactly
    assert costs.pick_accum(None, 256, cap + 1e12, world=8, memory=mem)[0] == 1
    tiny = costs.Memory(params=10**5, fm_row=1e4, jvp_row=1e4, ratio=0.25)   # the tiny tier's scale: no "0.0 GiB"
    assert costs.pick_accum(None, 32, 2**30, memory=tiny) == (
        1, "predicted peak 1.9 MiB of 1.0 GiB available (state 1.9 MiB, 9.8 KiB per example)")
    n, why = costs.pick_accum(None, 256, 19e9, world=8, memory=mem)
    assert n == 256 and why.startswith("does not fit")
