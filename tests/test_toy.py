"""The 2D checkerboard: one-step MeanFlow must beat one-step Flow Matching by >= 3x in sliced
Wasserstein distance, and two steps must not be worse than one beyond noise (CPU, ~1-2 minutes)."""
import statistics

import pytest
import torch

from meanflow import toy


def swds(net, nfe, seeds=range(5)):
    return [toy.evaluate(net, nfe, n=4096, seed=s)[0] for s in seeds]


@pytest.mark.slow
def test_meanflow_beats_flow_matching_in_one_step():
    mf = toy.train_toy(toy.toy_config())
    fm = toy.train_toy(toy.toy_config(meanflow={"ratio": 0.0}))
    mf1, mf2, fm1 = swds(mf, 1), swds(mf, 2), swds(fm, 1)
    m1, m2, f1 = (statistics.mean(s) for s in (mf1, mf2, fm1))
    print(f"SWD: MeanFlow 1-NFE {m1:.4f}, 2-NFE {m2:.4f}; Flow Matching 1-NFE {f1:.4f}")
    assert f1 >= 3 * m1
    noise = 2 * (statistics.stdev(mf1) ** 2 + statistics.stdev(mf2) ** 2) ** 0.5
    assert m2 <= m1 + noise
    floor = toy.sliced_wasserstein(toy.checkerboard(4096, torch.Generator().manual_seed(7)),
                                   toy.checkerboard(4096, torch.Generator().manual_seed(8)))
    assert m1 < 6 * floor  # a real checkerboard, not merely less blurry


def test_sliced_wasserstein_is_a_distance():
    g = torch.Generator().manual_seed(0)
    a = toy.checkerboard(2048, g)
    assert toy.sliced_wasserstein(a, a) == 0.0
    shifted = toy.sliced_wasserstein(a, a + torch.tensor([1.0, 0.0]))
    assert 0.3 < shifted < 1.0  # a unit shift projects to E|cos| = 2/pi on average
