"""Attention that works under forward-mode AD (torch.func.jvp and torch.autograd.forward_ad).

Fused SDPA kernels (flash, memory-efficient, CPU flash) have no forward-mode derivative, so
`torch.func.jvp` through them raises NotImplementedError, and plain math attention is slow.
`attention(q, k, v)` calls fused SDPA directly when no tangent is present; under a jvp it goes
through `JVPAttention`, whose primal is still fused SDPA and whose tangent follows the rule

    O = P V,  P = softmax(S),  S = scale * Q K^T
    dS = scale * (dQ K^T + Q dK^T)
    dP = P * (dS - rowsum(P * dS))
    dO = P dV + dP V.

Its backward (needed when the jvp pass also carries gradients) recomputes SDPA under autograd.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch._C._functorch import is_functorch_wrapped_tensor


def _has_tangent(x: torch.Tensor) -> bool:
    # torch.func.jvp wraps its inputs; forward_ad attaches a dual. Either means a tangent may flow.
    return is_functorch_wrapped_tensor(x) or fwAD.unpack_dual(x).tangent is not None


class JVPAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v on (B, H, N, D) tensors, with a jvp rule and a backward."""

    @staticmethod
    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, output)

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            qkv = [x.detach().requires_grad_() for x in (q, k, v)]
            out = F.scaled_dot_product_attention(*qkv)
            return torch.autograd.grad(out, qkv, g)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v, out = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
        ds = torch.zeros_like(p)
        if dq is not None:
            ds = ds + dq @ k.transpose(-2, -1)
        if dk is not None:
            ds = ds + q @ dk.transpose(-2, -1)
        pds = p * (ds * scale)
        # dP V = (P*dS) V - rowsum(P*dS) * O: avoids forming dP explicitly
        dout = pds @ v - pds.sum(-1, keepdim=True) * out
        if dv is not None:
            dout = dout + p @ dv
        return dout


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, N, D); fused when no tangent, jvp-capable otherwise."""
    if _has_tangent(q) or _has_tangent(k) or _has_tangent(v):
        return JVPAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain math attention: the reference the fused paths are tested against."""
    p = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
    return p @ v
