"""Fused cross-attention to the learnable prior, forward and backward, in Triton.

The bottleneck attends from the 16F channels of every sample (queries B x heads x L x hd,
L = 768 and hd = 9 at roi 96) to the projected prior (keys and values heads x L x hd), which is
the same for the whole batch. This is the window-attention kernel of
kernels/window_attention.py without bias or mask: the keys and values are passed with batch
stride 0 (never expanded in memory), the head dim is padded to 16 in registers, and the dK/dV
program loops over the batch so the prior's gradient is summed in registers (deterministic,
no atomics).
"""
import torch
from einops import rearrange

from kernels.window_attention import attention_backward, attention_forward


class PriorAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        b, heads, n, hd = q.shape
        # (b, L, heads, hd) storage, so the caller's "b h l d -> b l (h d)" is a free view
        out = rearrange(q.new_empty(b, n, heads, hd), "b l h d -> b h l d")
        lse = attention_forward(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), out)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        b = q.shape[0]
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        attention_backward(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), out, dout, lse,
                           dq, dk.expand(b, -1, -1, -1), dv.expand(b, -1, -1, -1), shared_kv=True)
        return dq, dk, dv


def prior_attention_triton(q, k, v):
    """softmax(q k^T hd^-0.5) v with k, v shared by the batch; same contract as
    model.prior_attention(backend="naive"). q (B, heads, L, hd); k, v (heads, L, hd).
    Returns (B, heads, L, hd)."""
    if q.ndim != 4 or k.ndim != 3 or v.shape != k.shape or q.shape[1:] != k.shape:
        raise ValueError(f"expected q (B, heads, L, hd) and k, v (heads, L, hd), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return PriorAttentionFunction.apply(q, k, v)
