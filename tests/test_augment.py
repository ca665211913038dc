"""EDM augmentation as py-meanflow configures it (meanflow.data.augment), the learning-rate warm-up
(meanflow.training.lr), and a kill-free resume that stays bitwise identical with both on (tiny SongUNet)."""
import math

import pytest
import torch

from data_fakes import digits_store
from meanflow import config
from meanflow.data.augment import AUGMENT_DIM, augment
from meanflow.training.checkpoint import checkpoints
from meanflow.training.distributed import init_distributed
from meanflow.training.loop import Loop, Preempted, Replica, train
from meanflow.training.lr import lr_at, total_steps


def images(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def test_statistics_match_the_official_pipe():
    x = images()
    out, lab = augment(x, 0.12, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and lab.shape == (len(x), AUGMENT_DIM)
    flip, scale, aniso, trans = lab[:, 0], lab[:, 1], lab[:, 2:4], lab[:, 4:6]
    n = len(x)
    se = lambda p: 4 * math.sqrt(p * (1 - p) / n)  # noqa: E731  4 standard errors
    assert abs((flip == 1).float().mean() - 0.5) < se(0.5)  # xflip = 1e8: a fair coin on every image
    for on in ((scale != 0), (aniso != 0).any(1), (trans != 0).any(1)):
        assert abs(on.float().mean() - 0.12) < se(0.12)  # each geometric transform with probability p
    assert abs(scale[scale != 0].std() - 1) < 0.1 and abs(trans[trans != 0].std() - 1) < 0.1  # w ~ N(0, 1)
    # a flipped, otherwise untouched image is the mirror image (up to EDM's sym6 resampling)
    plain = (lab[:, 1:] == 0).all(1)
    ref = torch.where(flip.view(-1, 1, 1, 1) == 1, x.flip(3), x)
    assert (out[plain] - ref[plain]).abs().max() < 1e-4
    assert (out[~plain] - ref[~plain]).abs().amax((1, 2, 3)).median() > 0.1  # the others moved
    # the same generator seed gives the same batch
    again, lab2 = augment(x, 0.12, torch.Generator().manual_seed(1))
    assert torch.equal(again, out) and torch.equal(lab2, lab)


def test_translation_moves_content_by_the_label():
    x = torch.zeros(1, 1, 32, 32)
    x[..., 12:20, 12:20] = 1
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # until a pure translation comes up (p = 1: every geometric transform on)
        out, lab = augment(x, 1.0, g)
        if lab[0, 0] == 0:
            break
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    com = lambda im: ((im * xs).sum() / im.sum(), (im * ys).sum() / im.sum())  # noqa: E731
    # scale and aniso keep the centre; translation shifts it by 0.125 * 32 * w
    cx, cy = com(out[0, 0].clamp(min=0))
    assert abs(cx - (15.5 + 4 * lab[0, 4])) < 0.6 and abs(cy - (15.5 + 4 * lab[0, 5])) < 0.6


def test_p0_is_the_identity_with_zero_labels():
    x = images(16)
    out, lab = augment(x, 0.0, torch.Generator().manual_seed(0))
    assert out is x and torch.equal(lab, torch.zeros(16, AUGMENT_DIM))


def test_warmup_schedule_values():
    lr, w = 6e-4, 10_000
    assert lr_at(0, lr, w) == pytest.approx(1e-8)  # py-meanflow's LinearLR start
    assert lr_at(5_000, lr, w) == pytest.approx(1e-8 + (lr - 1e-8) * 0.5)
    assert lr_at(9_999, lr, w) == pytest.approx(lr * 0.9999, rel=1e-6)
    assert lr_at(10_000, lr, w) == lr_at(800_000, lr, w) == lr
    assert lr_at(0, lr, 0) == lr  # off
    # PyTorch's own LinearLR gives the same values
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-8 / lr, end_factor=1.0, total_iters=w)
    for k in range(0, 12_000):
        if k in (0, 1, 777, 9_999, 10_000, 11_999):
            assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(k, lr, w), rel=1e-9)
        opt.step()
        sched.step()


def test_epochs_give_floor_of_store_over_batch_steps():
    cfg = config.build({"train": {"epochs": 80, "batch": 256}})
    assert total_steps(cfg.train, 1_281_167) == 80 * 5004
    assert total_steps(config.build({"train": {"steps": 7}}).train, 10) == 7


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_store(tmp_path_factory.mktemp("aug_data"), flip=True)


def unet_cfg(data_root, runs_root, **train):
    return config.build({
        "data": {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8, "num_classes": 10,
                 "vae": None, "flip": True, "root": str(data_root), "device": "cpu", "augment": 0.5},
        "model": {"arch": "unet", "name": "unet-t", "channels": 8, "channel_mult": [1, 2], "layers_per_block": 1,
                  "attn_resolutions": [4], "dropout": 0.1},
        "train": {"steps": 8, "batch": 8, "lr": 0.002, "ema": 0.9, "warmup_steps": 6, "ckpt_every": 3,
                  "keep_ckpts": 5, "log_every": 2, "device": "cpu", "runs_root": str(runs_root), **train}}, tier="t")


def test_resume_is_bitwise_identical_with_warmup_and_augmentation(digits, tmp_path):
    ref = unet_cfg(digits, tmp_path / "a")
    assert ref.run_id == unet_cfg(digits, tmp_path / "b").run_id
    train(ref, progress=False)
    cfg = unet_cfg(digits, tmp_path / "b")
    tr = Loop(Replica(cfg, init_distributed("cpu")), progress=False)
    tr.open()
    try:
        batch = tr.group.load(0)
        assert batch.aug.shape == (8, AUGMENT_DIM) and (batch.aug[:, 0] == 1).any()
        for _ in range(4):
            tr.advance()
        with pytest.raises(Preempted):
            tr.advance(stop_requested=True)  # checkpoint of step 5, mid warm-up
    finally:
        tr.close()
    state = torch.load(checkpoints(cfg.run_dir)[-1][1] / "state.pt", weights_only=True)
    assert state["step"] == 5 and state["optimizer"]["param_groups"][0]["lr"] == lr_at(4, 0.002, 6)
    train(cfg, progress=False)  # resumes at step 5
    a, b = ref.run_dir / "ema.safetensors", cfg.run_dir / "ema.safetensors"
    assert a.read_bytes() == b.read_bytes()
    # augmentation and warm-up change the weights (both are on the path the test checks)
    plain = config.build({**cfg.raw, "data": {**cfg.raw["data"], "augment": 0.0},
                          "train": {**cfg.raw["train"], "runs_root": str(tmp_path / "c")}}, tier="t")
    train(plain, progress=False)
    assert (plain.run_dir / "ema.safetensors").read_bytes() != a.read_bytes()
