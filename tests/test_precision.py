"""train.precision (meanflow.runtime): the autocast dtype and TF32 flags each value chooses on a
CUDA device (decided without running CUDA), plain fp32 on CPU whatever the value (a bf16 config
trains bitwise as an fp32 one), and the precision used recorded in the train manifest. The CUDA
steps themselves are in test_cuda.py."""
import json
import logging
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file

from data_fakes import digits_store
from meanflow import config, runtime
from meanflow.training.checkpoint import checkpoints
from meanflow.training.loop import train
from meanflow.training.lr import lr_at

CUDA, CPU = torch.device("cuda"), torch.device("cpu")   # a device object only: nothing runs on it


@pytest.fixture
def tf32_flags():
    """Put the process-global TF32 flags back after the test."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_plan_of_each_precision():
    assert runtime.precision_plan(CUDA, "bf16") == (torch.bfloat16, None)   # the flags as before
    assert runtime.precision_plan(CUDA, "tf32") == (None, True)
    assert runtime.precision_plan(CUDA, "fp32") == (None, False)
    assert runtime.precision_plan(torch.device("cuda", 1), "bf16") == (torch.bfloat16, None)
    for p in runtime.PRECISIONS:
        assert runtime.precision_plan(CPU, p) == (None, None)
        assert isinstance(runtime.autocast(CPU, p), nullcontext)
        assert runtime.precision_used(CPU, p) == "fp32" and runtime.precision_used(CUDA, p) == p
    assert runtime.precision_plan(CUDA) == runtime.precision_plan(CUDA, config.build({}).train.precision)
    for p in ("tf32", "fp32"):
        assert isinstance(runtime.autocast(CUDA, p), nullcontext)
    with pytest.raises(ValueError, match="train.precision = 'fp16'"):
        runtime.precision_plan(CUDA, "fp16")


def test_use_precision_sets_the_tf32_flags(tf32_flags, caplog):
    for p, want in (("tf32", (True, True)), ("fp32", (False, False)), ("bf16", (False, False))):  # bf16: untouched
        assert runtime.use_precision(CUDA, p) == p
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == want, p
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with caplog.at_level(logging.INFO, logger="meanflow.runtime"):
        assert runtime.use_precision(CPU, "tf32") == "fp32"   # the CPU: fp32, flags left alone
        assert runtime.use_precision(CPU, "fp32") == "fp32"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert [r.getMessage() for r in caplog.records] == ["train.precision = tf32 applies on CUDA only: training on cpu in fp32"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_store(tmp_path_factory.mktemp("precision_data"), flip=True)


def tiny_cfg(data_root, runs_root, **train):
    return config.build({
        "data": {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8, "num_classes": 10,
                 "vae": None, "flip": True, "root": str(data_root), "device": "cpu"},
        "model": {"name": "custom", "depth": 2, "hidden": 32, "heads": 2, "patch": 4},
        "train": {"steps": 3, "batch": 8, "lr": 0.001, "ema": 0.9, "ckpt_every": 3, "log_every": 1, "device": "cpu",
                  "warmup_steps": 5, "warmup_start": 0.0, "runs_root": str(runs_root), **train}}, tier="t")


def test_cpu_trains_fp32_whatever_the_precision_and_records_it(digits, tmp_path):
    runs = {p: tiny_cfg(digits, tmp_path / p, precision=p) for p in ("bf16", "fp32")}
    for cfg in runs.values():
        train(cfg, progress=False)
    a, b = (load_file(c.run_dir / "ema.safetensors") for c in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for p, cfg in runs.items():
        m = json.loads((cfg.run_dir / "train_manifest.json").read_text())
        assert m["env"]["precision"] == "fp32" and m["config"]["train"]["precision"] == p
    # the loop's warm-up starts at train.warmup_start (here 0: the official iMF schedule)
    state = torch.load(checkpoints(runs["fp32"].run_dir)[-1][1] / "state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == lr_at(2, 0.001, 5, 0.0) == pytest.approx(0.001 * 2 / 5)
