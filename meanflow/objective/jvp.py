"""du/dt for both objectives: the generic jvp (torch.func or forward-mode dual tensors) or the DiT's
hand-derived tangent pass (models/tangent.py), picked by meanflow.jvp_api."""
from __future__ import annotations

import warnings

import torch
import torch.autograd.forward_ad as fwAD

from ..models import tangent as explicit_tangent

# torch scripts its own jvp decompositions on the first forward-AD call, warning about itself
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

# jvp tangents of (r, t) for each Table 1b variant "(v, dr, dt)"
TANGENTS = {"v01": (0.0, 1.0), "v00": (0.0, 0.0), "v10": (1.0, 0.0), "v11": (1.0, 1.0)}


def jvp(fn, primals, tangents, api: str = "func"):
    """(fn(*primals), its directional derivative along tangents), through torch.func.jvp or the
    torch.autograd.forward_ad dual-tensor API (same rules; fewer wrapper layers per op); for
    "explicit", fn computes the pair itself (models.tangent)."""
    if api == "explicit":  # fn returns the pair itself
        return fn(*primals)
    if api == "func":
        return torch.func.jvp(fn, primals, tangents)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents))))
        return out.primal, out.tangent


def jvp_plan(net, u_fn, api: str, tangents, y=None):
    """(u_fn, api) for `jvp`. On "explicit": the DiT's hand-derived rules on (z, t, h = t - r) with
    dh = dt - dr for tangents (dz, dr, dt) when `supports(net)` (exactly the DiT), else forward_ad
    with a warning (the U-Net, the iMF DiT: explicit_tangent covers no other net)."""
    taken = api_taken(net, api)
    if taken != "explicit":
        if api == "explicit":
            _warn_fallback(net)
        return u_fn, taken
    dz, dr, dt = tangents
    return (lambda z_, r_, t_: explicit_tangent.dit_jvp(net, (z_, t_, t_ - r_), (dz, dt, dt - dr), y)), taken


def api_taken(net, api: str) -> str:
    """The jvp path `api` takes on `net`: "explicit" is forward_ad beyond the DiT."""
    return "forward_ad" if api == "explicit" and not explicit_tangent.supports(net) else api


def _warn_fallback(net):
    if type(net) not in _WARNED:
        _WARNED.add(type(net))
        warnings.warn(f"meanflow.jvp_api: 'explicit' covers the DiT only; {type(net).__name__} uses forward_ad")


_WARNED: set = set()
