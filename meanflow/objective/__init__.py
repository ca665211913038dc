"""The training objectives, one call signature and one output (base.py):

    meanflow.py   MeanFlow: u regressed to v_g - clip(t - r, 0, 1) du/dt (Geng et al. 2025)
    imf.py        improved MeanFlow: V = u + (t - r) sg(du/dt) regressed to v_g, guidance as a condition
    base.py       the shared draws, label-drop layout, adaptive weight, loss output and network velocity
    jvp.py        du/dt: torch.func, forward-mode AD, or the DiT's explicit tangent pass

`build_objective(cfg.meanflow, num_classes)` picks one, as meanflow.objective names.
"""
from .base import LossOutput, Objective
from .imf import IMF
from .jvp import TANGENTS
from .meanflow import MeanFlow

__all__ = ["IMF", "LossOutput", "MeanFlow", "Objective", "TANGENTS", "build_objective"]


def build_objective(meanflow_cfg, num_classes: int = 0) -> Objective:
    """MeanFlow or iMF, as meanflow.objective names."""
    return IMF(meanflow_cfg, num_classes) if meanflow_cfg.objective == "imf" else MeanFlow(meanflow_cfg, num_classes)
