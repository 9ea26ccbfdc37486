"""Fused (shifted-)window attention for the 3-D Swin blocks, forward and backward, in Triton.

Algorithm (FlashAttention-2 without the causal mask): every program holds a block of queries,
streams the keys and values of its window in blocks and keeps an online softmax in fp32
(running max and sum, exp2 domain), so the windows x heads x n x n logits never reach memory.
The logits are q k^T * hd^-0.5 + bias[h, i, j] (- 100 where the two tokens lie in different
shift regions, MONAI's mask); keys past the window size n (n <= 343 is padded to a block
multiple) get -inf. The bias is the per-head (heads, n, n) gather table[index], read by every
window; the shift mask is never stored: each program compares the region ids of its tokens.

Backward recomputes the probabilities from the saved log-sum-exp:
    delta_i = sum_d dO_id O_id
    dS = P * (dO V^T - delta),  dQ = dS K s,  dK = dS^T Q s,  dV = P^T dO,  dBias = sum_b dS
with one kernel for dK/dV (a key block per program, looping over the query blocks), one for
dQ (a query block per program) and one for dBias (a (query block, key block) tile per program,
looping over the windows of the batch). dBias is summed in registers over a group of windows;
the groups are either summed afterwards in a fixed order (deterministic) or added with atomics.
The gradient then flows to the (2197, heads) table through the autograd of table[index].

The same kernels serve the prior cross-attention (kernels/prior_attention.py): keys and values
with batch stride 0, no bias, and dK/dV summed over the batch inside the program.

Inputs are bf16, fp16 or fp32 with head dims up to 128 (padded in registers to a power of two
>= 16, the smallest tl.dot size); accumulation is always fp32. The PyTorch reference is
model.window_attention(..., backend="naive"); tests/test_kernels.py compares the two.
"""
import os

import torch
import triton
import triton.language as tl
from einops import rearrange

# (BLOCK_M queries, BLOCK_N keys, warps) of each kernel by padded head dim: the largest tiles
# whose code stays within the register budget on sm_80 and sm_90 without spills
# (kernels/static.py compiles every one of them; docs/benchmarks.md has the table).
CONFIGS = {
    "fwd": {16: (32, 16, 4), 32: (16, 32, 4)},
    "delta": {16: (64, 16, 4), 32: (64, 16, 4)},
    "dkdv": {16: (16, 16, 4), 32: (16, 16, 4)},
    "dq": {16: (32, 16, 4), 32: (16, 32, 4)},
    "dbias": {16: (16, 16, 4), 32: (16, 16, 8)},
}
LOG2E = 1.4426950408889634
GROUP_PROGRAMS = 1024  # dBias: about this many programs; the partial sums stay <= 16 MiB fp32


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _logits(q, kT, Bias, Region, h, w, rows, cols, N, qk_scale,
            HAS_BIAS: tl.constexpr, HAS_REGION: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits in the log2 domain, padded keys at -inf."""
    mask_m = rows < N
    mask_n = cols < N
    s = tl.dot(q, kT, input_precision=PREC) * qk_scale
    if HAS_BIAS:
        bias = tl.load(Bias + h * N * N + rows[:, None] * N + cols[None, :],
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    if HAS_REGION:
        rq = tl.load(Region + w * N + rows, mask=mask_m, other=-1)
        rk = tl.load(Region + w * N + cols, mask=mask_n, other=-1)
        s = tl.where(rq[:, None] != rk[None, :], s - 100.0 * 1.4426950408889634, s)
    return tl.where(mask_n[None, :], s, float("-inf"))


@triton.jit
def _attn_fwd(Q, K, V, Bias, Region, O, Lse,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
              H, N, NW, qk_scale,
              HD: tl.constexpr, HD_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REGION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD_PAD)
    mask_m = rows < N
    mask_d = offs_d < HD
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        mask_kv = (cols < N)[None, :] & mask_d[:, None]
        kT = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None], mask=mask_kv, other=0.0)
        s = _logits(q, kT, Bias, Region, h, b % NW, rows, cols, N, qk_scale, HAS_BIAS, HAS_REGION, PREC)
        # every key block holds at least one real key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :],
                    mask=(cols < N)[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * N + rows, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_delta(O, DO, Delta, sob, soh, son, sdb, sdh, sdn, H, N,
                    HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD_PAD)
    mask = (rows < N)[:, None] & (offs_d < HD)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N + rows, delta, mask=rows < N)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, Bias, Region, DO, Lse, Delta, DK, DV,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                   B, H, N, NW, qk_scale, sm_scale,
                   HD: tl.constexpr, HD_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REGION: tl.constexpr,
                   SHARED_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """One key block of one (batch, head); with SHARED_KV one key block of one head, summed
    over the whole batch (the prior's keys and values are the same for every sample)."""
    pid_n = tl.program_id(0)
    pid = tl.program_id(1)
    if SHARED_KV:
        h = pid
        b_lo = pid * 0
        b_hi = B
    else:
        h = pid % H
        b_lo = pid // H
        b_hi = b_lo + 1
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HD_PAD)
    mask_d = offs_d < HD
    mask_kv = (cols < N)[:, None] & mask_d[None, :]
    kb = b_lo.to(tl.int64)
    k = tl.load(K + kb * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=mask_kv, other=0.0)
    v = tl.load(V + kb * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=mask_kv, other=0.0)
    dk = tl.zeros([BLOCK_N, HD_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HD_PAD], tl.float32)
    for bi in range(b_lo, b_hi):
        b = tl.cast(bi, tl.int64)
        for start_m in range(0, N, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            mask_m = rows < N
            mask_q = mask_m[:, None] & mask_d[None, :]
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=mask_q, other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=mask_q, other=0.0)
            lse = tl.load(Lse + (b * H + h) * N + rows, mask=mask_m, other=0.0)
            delta = tl.load(Delta + (b * H + h) * N + rows, mask=mask_m, other=0.0)
            s = _logits(q, tl.trans(k), Bias, Region, h, b % NW, rows, cols, N, qk_scale,
                        HAS_BIAS, HAS_REGION, PREC)
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(mask_m[:, None], p, 0.0)  # (BLOCK_M, BLOCK_N); padded queries add nothing
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    tl.store(DK + kb * sdkb + h * sdkh + cols[:, None] * sdkn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=mask_kv)
    tl.store(DV + kb * sdvb + h * sdvh + cols[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=mask_kv)


@triton.jit
def _attn_bwd_dq(Q, K, V, Bias, Region, DO, Lse, Delta, DQ,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sdqb, sdqh, sdqn,
                 H, N, NW, qk_scale, sm_scale,
                 HD: tl.constexpr, HD_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REGION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD_PAD)
    mask_m = rows < N
    mask_d = offs_d < HD
    mask_q = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=mask_q, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=mask_q, other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * N + rows, mask=mask_m, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N + rows, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        mask_kv = (cols < N)[:, None] & mask_d[None, :]
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=mask_kv, other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=mask_kv, other=0.0)
        s = _logits(q, tl.trans(k), Bias, Region, h, b % NW, rows, cols, N, qk_scale, HAS_BIAS, HAS_REGION, PREC)
        p = tl.math.exp2(s - lse[:, None])  # padded keys: exp2(-inf) = 0
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqn + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=mask_q)


@triton.jit
def _attn_bwd_dbias(Q, K, V, Bias, Region, DO, Lse, Delta, DBias,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                    B, H, N, NW, G, qk_scale,
                    HD: tl.constexpr, HD_PAD: tl.constexpr, HAS_REGION: tl.constexpr, ATOMIC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """dS of one (query block, key block, head) tile summed over the windows b = g, g + G, ...
    Deterministic: written to DBias[g, h] (summed over g afterwards); else added atomically."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_hg = tl.program_id(2)
    h = pid_hg % H
    g = pid_hg // H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HD_PAD)
    mask_m = rows < N
    mask_d = offs_d < HD
    mask_q = mask_m[:, None] & mask_d[None, :]
    mask_kv = (cols < N)[:, None] & mask_d[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for bi in range(g, B, G):
        b = tl.cast(bi, tl.int64)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=mask_q, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=mask_q, other=0.0)
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=mask_kv, other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=mask_kv, other=0.0)
        lse = tl.load(Lse + (b * H + h) * N + rows, mask=mask_m, other=0.0)
        delta = tl.load(Delta + (b * H + h) * N + rows, mask=mask_m, other=0.0)
        s = _logits(q, tl.trans(k), Bias, Region, h, b % NW, rows, cols, N, qk_scale, True, HAS_REGION, PREC)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        acc += p * (dp - delta[:, None])
    mask = mask_m[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    if ATOMIC:
        tl.atomic_add(DBias + h * N * N + offs, acc, mask=mask)
    else:
        tl.store(DBias + (g.to(tl.int64) * H + h) * N * N + offs, acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers on (B, H, N, D) views (unit stride on D; keys and values may have batch stride 0)


def _check_device(t):
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("the triton attention backend needs a CUDA tensor (or TRITON_INTERPRET=1 to run the "
                           f"kernels in the interpreter); got a {t.device.type} tensor: use attn_backend='sdpa'")


def head_pad(d):
    return max(16, triton.next_power_of_2(d))


def launch_meta(kernel, d, fp32, bias, region):
    """The compile-time arguments of one kernel (those it takes) and its warps for head dim d
    (CONFIGS)."""
    bm, bn, warps = CONFIGS[kernel][head_pad(d)]
    meta = dict(HD=d, HD_PAD=head_pad(d), HAS_BIAS=bias, HAS_REGION=region, BLOCK_M=bm, BLOCK_N=bn,
                PREC="ieee" if fp32 else "tf32")
    return {**{k: v for k, v in meta.items() if k in KERNELS[kernel].arg_names}, "num_warps": warps}


def _meta(kernel, q, bias, region):
    return launch_meta(kernel, q.shape[-1], q.dtype == torch.float32, bias is not None, region is not None)


def _s3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def bias_groups(b, heads, n, bm, bn):
    """Window groups of the dBias reduction: enough programs to fill the GPU, at most b."""
    tiles = triton.cdiv(n, bm) * triton.cdiv(n, bn) * heads
    return max(1, min(b, triton.cdiv(GROUP_PROGRAMS, tiles)))


def attention_forward(q, k, v, out, bias=None, region=None):
    """out <- softmax(q k^T hd^-0.5 + bias + region mask) v; returns the log2-domain
    log-sum-exp (B, H, N) fp32. q, k, v, out: (B, H, N, D); bias: (H, N, N) fp32 or None;
    region: (nw, N) int32 or None, window b uses region[b % nw]."""
    _check_device(q)
    b, h, n, d = q.shape
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    dummy = lse
    nw = region.shape[0] if region is not None else 1
    meta = _meta("fwd", q, bias, region)
    _attn_fwd[(triton.cdiv(n, meta["BLOCK_M"]), b * h)](
        q, k, v, dummy if bias is None else bias, dummy if region is None else region, out, lse,
        *_s3(q), *_s3(k), *_s3(v), *_s3(out), h, n, nw, d**-0.5 * LOG2E, **meta)
    return lse


def attention_backward(q, k, v, out, dout, lse, dq, dk, dv, bias=None, region=None, shared_kv=False,
                       need_dbias=True, deterministic=True):
    """Fills dq, dk, dv ((B, H, N, D) views; with shared_kv dk and dv have batch stride 0 and are
    summed over the batch). Returns dBias (H, N, N) fp32 when bias is given and need_dbias."""
    b, h, n, d = q.shape
    nw = region.shape[0] if region is not None else 1
    delta = torch.empty_like(lse)
    dummy = delta
    bias_arg = dummy if bias is None else bias
    region_arg = dummy if region is None else region
    qk_scale, sm_scale = d**-0.5 * LOG2E, d**-0.5
    meta = _meta("delta", q, bias, region)
    _attn_bwd_delta[(triton.cdiv(n, meta["BLOCK_M"]), b * h)](
        out, dout, delta, *_s3(out), *_s3(dout), h, n, **meta)
    strides = (*_s3(q), *_s3(k), *_s3(v), *_s3(dout))
    meta = _meta("dkdv", q, bias, region)
    _attn_bwd_dkdv[(triton.cdiv(n, meta["BLOCK_N"]), h if shared_kv else b * h)](
        q, k, v, bias_arg, region_arg, dout, lse, delta, dk, dv, *strides, *_s3(dk), *_s3(dv),
        b, h, n, nw, qk_scale, sm_scale, SHARED_KV=shared_kv, **meta)
    meta = _meta("dq", q, bias, region)
    _attn_bwd_dq[(triton.cdiv(n, meta["BLOCK_M"]), b * h)](
        q, k, v, bias_arg, region_arg, dout, lse, delta, dq, *strides, *_s3(dq),
        h, n, nw, qk_scale, sm_scale, **meta)
    if bias is None or not need_dbias:
        return None
    meta = _meta("dbias", q, bias, region)
    g = bias_groups(b, h, n, meta["BLOCK_M"], meta["BLOCK_N"])
    if deterministic:
        dbias = torch.empty(g, h, n, n, device=q.device, dtype=torch.float32)
    else:
        dbias = torch.zeros(h, n, n, device=q.device, dtype=torch.float32)
    _attn_bwd_dbias[(triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), g * h)](
        q, k, v, bias, region_arg, dout, lse, delta, dbias, *strides,
        b, h, n, nw, g, qk_scale, ATOMIC=not deterministic, **meta)
    return dbias.sum(0) if deterministic else dbias


KERNELS = {"fwd": _attn_fwd, "delta": _attn_bwd_delta, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq,
           "dbias": _attn_bwd_dbias}


# ----------------------------------------------------------------------------------------------
# autograd


def _split(qkv):
    """(b, n, 3, heads, hd) -> q, k, v as (b, heads, n, hd) views of the packed tensor."""
    return rearrange(qkv, "b n three h d -> three b h n d").unbind(0)


class WindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, region, deterministic):
        b, n, _, heads, hd = qkv.shape
        out = qkv.new_empty(b, n, heads * hd)
        lse = attention_forward(*_split(qkv), rearrange(out, "b n (h d) -> b h n d", h=heads), bias, region)
        ctx.save_for_backward(qkv, bias, region, out, lse)
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, bias, region, out, lse = ctx.saved_tensors
        heads = qkv.shape[3]
        dout = dout.contiguous()
        dqkv = torch.empty_like(qkv)
        out, dout = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (out, dout))
        dbias = attention_backward(*_split(qkv), out, dout, lse, *_split(dqkv), bias, region,
                                   need_dbias=ctx.needs_input_grad[1], deterministic=ctx.deterministic)
        return dqkv, dbias, None, None


def window_attention_triton(qkv, table, index, region=None, deterministic=None):
    """Fused window attention, same contract as model.window_attention(backend="naive").

    qkv (b, n, 3, heads, hd) with b = batch * windows (windows batch-major); table (T, heads);
    index (n, n) long rows of table; region (nw, n) int region ids or None. Returns
    (b, n, heads * hd). deterministic=None follows torch.are_deterministic_algorithms_enabled().
    """
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (b, n, 3, heads, hd), got {tuple(qkv.shape)}")
    b, n, _, heads, hd = qkv.shape
    if qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"qkv must be float32, bfloat16 or float16, got {qkv.dtype}")
    if tuple(index.shape) != (n, n):
        raise ValueError(f"index must be ({n}, {n}) for {n} tokens, got {tuple(index.shape)}")
    if table.ndim != 2 or table.shape[1] != heads:
        raise ValueError(f"table must be (rows, {heads}), got {tuple(table.shape)}")
    if region is not None:
        if region.ndim != 2 or region.shape[1] != n or b % region.shape[0]:
            raise ValueError(f"region must be (windows, {n}) with windows dividing {b}, got {tuple(region.shape)}")
        region = region.to(device=qkv.device, dtype=torch.int32).contiguous()
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    _check_device(qkv)
    # (heads, n, n) fp32 bias shared by every window; its autograd scatters dBias into the table
    bias = rearrange(table[index.reshape(-1)], "(i j) h -> h i j", i=n).float().contiguous()
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return WindowAttentionFunction.apply(qkv, bias, region, deterministic)
