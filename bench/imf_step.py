"""iMF train-step time over MeanFlow's on the same backbone, measured in one run (a ratio, so the
machine cancels out). Backbones: the adaLN DiT as IMFDiT (what the imf1 rows v_boundary .. interval_cond
train) and the full iMF DiT (in-context, improved block). MeanFlow: ratio 0.25, CFG omega' = 2 via
kappa 0.5; iMF: ratio 0.5, its guidance pass, jvp tangent = the network's v, v-head when asked.

    python bench/imf_step.py [--size tiny|b4] [--batch 32] [--steps 20]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from meanflow import config  # noqa: E402
from meanflow.objective import IMF, MeanFlow  # noqa: E402
from meanflow.models.imf_dit import IMFDiT  # noqa: E402

SIZES = {"tiny": dict(input_size=8, patch=4, in_channels=1, hidden=64, depth=2, heads=4, num_classes=10, head_depth=1,
                      tokens=(2, 1, 1, 1)),
         "b4": dict(input_size=32, patch=4, in_channels=4, hidden=384, depth=6, heads=6, num_classes=1000, head_depth=2)}


def mf_cfg(**kw):
    """The meanflow section: the schema's defaults (ImageNet's), kappa 0.5, generic jvp for both."""
    return config.build({"meanflow": {"kappa": 0.5, "jvp_api": "forward_ad", **kw}}).meanflow


def step_time(objective, net, x, y, steps):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator(x.device).manual_seed(0)
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        objective(net, x, y, generator=g).loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    s = SIZES[a.size]
    torch.manual_seed(0)
    x = torch.randn(a.batch, s["in_channels"], s["input_size"], s["input_size"])
    y = torch.randint(0, s["num_classes"], (a.batch,))
    plain = dict(swiglu=False, rmsnorm=False, rope=False, qk_norm=False, time_cond="t,t-r")
    cases = {  # name: (backbone kwargs of both, iMF config)
        "adaLN DiT, iMF boundary v": (dict(cond="adaln", **plain), dict(v_source="boundary", omega=2.0)),
        "adaLN DiT, iMF v-head + omega/interval": (dict(cond="adaln", **plain),
                                                   dict(v_source="head", omega_cond=True, interval_cond=True)),
        "iMF DiT (in-context, improved), full iMF": (dict(cond="in_context"),
                                                     dict(v_source="head", omega_cond=True, interval_cond=True)),
    }
    for name, (bk, ik) in cases.items():
        ic = mf_cfg(objective="imf", ratio=0.5, kappa=0.0, **ik)
        head, conds = ic.v_source == "head", (ic.omega_cond, ic.interval_cond)
        mk = lambda v_head, oc, itv: IMFDiT(**{k: v for k, v in s.items()}, v_head=v_head, omega_cond=oc,
                                            interval_cond=itv, **bk)
        torch.manual_seed(0)
        t_mf = step_time(MeanFlow(mf_cfg(), s["num_classes"]), mk(False, False, False), x, y, a.steps)
        torch.manual_seed(0)
        t_imf = step_time(IMF(ic, s["num_classes"]), mk(head, *conds), x, y, a.steps)
        print(f"{a.size} batch {a.batch} | {name}: MeanFlow {t_mf * 1e3:.1f} ms, iMF {t_imf * 1e3:.1f} ms, "
              f"iMF / MeanFlow = {t_imf / t_mf:.2f}")


if __name__ == "__main__":
    main()
