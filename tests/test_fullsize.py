"""The smallest paper network at its real size (MF-B/4, 131M parameters, explicit jvp) through
bench/fullsize.py as a user runs it: two steps fp32 and bf16, checkpoint, resume bitwise, 1- and
2-NFE samples through a full-size random sd-vae to 256x256, the FID stage's Inception; the memory
model against the peak RSS at two batch sizes. The other networks: `python bench/fullsize.py`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from meanflow import costs, rehearsal

ROOT = Path(__file__).resolve().parent.parent
MODEL_RTOL = 0.15   # the memory model against the measured peak RSS (measured: see the closing note / docs/gpu-plan.md)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def b4(tmp_path_factory):
    d = tmp_path_factory.mktemp("fullsize")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "fullsize.py"), "--only", "MF-B/4", "--work", str(d / "work"),
                        "--json", str(d / "out.json")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    print(p.stdout)
    return json.loads((d / "out.json").read_text())[0], p.stdout, d / "work"


def test_b4_trains_checkpoints_and_resumes_bitwise(b4):
    r, table, work = b4
    assert r["network"] == "MF-B/4" and r["jvp_api"] == "explicit"
    assert abs(r["params"] / 1e6 - 131) < 1          # model_configs.csv: MF-B/4 131M
    assert r["stopped_at"] == 1 and list(r["steps"]) == [2, 2]
    assert r["resume_equal"] == {"model.safetensors": True, "ema.safetensors": True, "final ema": True, "adam": True}
    # weights, EMA (4 bytes each) and Adam's two moments (8) per parameter, plus headers and the rng state
    per_param = costs.WEIGHT + costs.EMA_COPY + costs.ADAM
    assert r["params"] * per_param <= r["checkpoint_bytes"] < r["params"] * per_param * 1.01
    losses = r["small"]["losses"] + r["big"]["losses"] + r["bf16"]["losses"]
    assert all(0 < v < float("inf") for v in losses)
    assert not list(work.glob("runs/*/*")), "the rehearsal leaves no run behind"
    assert "| MF-B/4 (explicit) | 131.2 |" in table


def test_b4_bf16_autocast_agrees_with_fp32(b4):
    f = b4[0]["bf16"]
    assert f["loss_rel"] < rehearsal.BF16_LOSS_RTOL and f["grad_cos"] > rehearsal.BF16_GRAD_COS
    assert f["loss_rel"] > 0 and f["grad_cos"] < 1 - 1e-9, "bf16 autocast did not change the arithmetic"
    assert f["finite"]


def test_b4_samples_decode_to_256px_and_are_scored(b4):
    r = b4[0]
    assert r["images"] == {"1": [2, 256, 256, 3], "2": [2, 256, 256, 3]}
    assert all(v is not None and v > 0 for v in r["fid"].values())


def test_memory_model_matches_peak_rss_at_two_batches(b4):
    r = b4[0]
    small, big = r["small"], r["big"]
    assert small["batch"] == 2 and big["batch"] >= 16   # activations outweigh the freed gradients there (B/4: b >= 11)
    for m in (small, big):
        assert abs(m["model"] - m["peak"]) / m["peak"] < MODEL_RTOL, m
    # the slope: what the extra examples cost, measured against the model
    slope_model, slope_rss = big["model"] - small["model"], big["peak"] - small["peak"]
    assert abs(slope_model - slope_rss) / slope_rss < MODEL_RTOL


def test_unknown_network_is_refused_before_any_work(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "fullsize.py"), "--only", "MF-XXL/2", "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown network MF-XXL/2; choose from MF-B/2, MF-B/4," in p.stderr
    assert "unet-cifar10" in p.stderr and not (tmp_path / "w").exists()
