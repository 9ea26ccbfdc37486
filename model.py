"""The network: a 3-D Swin UNETR (MONAI SwinUNETR v1 parity) and the personalized variant.

SwinUNETR          the plain network; its state dict is interchangeable with MONAI's
                   `monai.networks.nets.SwinUNETR(use_v2=False)` (same names, shapes, outputs).
PersonalizedSwinUNETR
                   adds the bottleneck of the method: a learnable prior O, channel-token
                   cross-attention Attn(z, O, O), T (two 3x3x3 convs) and Fuse([z, z']), plus
                   the equivariance head F_equ and the contrastive projection g.

All attention goes through `window_attention` and `prior_attention`, whose `backend`
(naive | sdpa | triton | auto) is chosen by the networks' `attn_backend=` argument.

Loaders (`load_monai`, `load_ssl_swinvit`, `load_reference`) map foreign checkpoints onto our
names, check every shape, print matched / missing / unexpected counts and fail when an
encoder key is missing.
"""
import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from sampling import n_phi
from files import read_checkpoint

BACKENDS = ("naive", "sdpa", "triton", "auto")

# Sub-voxel order (d, h, w offsets) of PatchMerging. "monai": MONAI >= 1.5. "legacy": the order
# of earlier MONAI releases (two offsets duplicated, two dropped) that the public 2022
# checkpoints were trained with.
MERGING_ORDERS = {
    "monai": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
    "legacy": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)),
}


# ----------------------------------------------------------------------------------------------
# attention


def _resolve_backend(backend, device):
    if backend == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def region_mask(region, dtype, masked=-100.0):
    """(nw, n, n): `masked` (MONAI's -100) between tokens of different shift regions, 0 within one."""
    return torch.where(region[:, :, None] != region[:, None, :], masked, 0.0).to(dtype)


class _BiasedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias + mask) v for a batch of windows sharing the position bias,
    the CPU path: PyTorch's fused CPU attention kernel forward (the logits are never
    materialised; it also returns the log-sum-exp of every row), and a backward that recomputes
    the probabilities from the log-sum-exp, a few windows at a time. Saves q, k, v, out and one
    value per row instead of a (b, heads, n, n) probability tensor per block (1 GiB per stage-1
    block pair at 96^3, F=48), and returns the bias gradient already summed over windows."""

    @staticmethod
    def forward(ctx, q, k, v, bias, region, scale):
        # q, k, v: (B, nw, heads, n, d) views of the packed qkv; bias: (1, heads, n, n);
        # region: (nw, n) or None. The kernel takes the strided views as they are. Without
        # shift one call covers every window and the bias broadcasts over them; with shift the
        # mask is per window and one call per batch element shares it.
        # The shift mask is -inf here instead of MONAI's -100: the probabilities are the same
        # in float32 (exp(-100) is below its resolution next to the row's maximum term, and the
        # outputs are bitwise equal), but exp(-100) is a float32 denormal, and the kernel runs
        # slower on blocks that hold them.
        B, nw, heads, n, d = q.shape
        attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        bias = bias.contiguous()
        if region is None:
            win = lambda t: t.reshape(B * nw, heads, n, d)
            out, lse = attend(win(q), win(k), win(v), 0.0, False, attn_mask=bias, scale=scale)
        else:
            mask = bias + region_mask(region, q.dtype, -math.inf)[:, None]  # (nw, heads, n, n)
            parts = [attend(q[b], k[b], v[b], 0.0, False, attn_mask=mask, scale=scale) for b in range(B)]
            out, lse = torch.stack([o for o, _ in parts]), torch.stack([s for _, s in parts])
        out, lse = out.view(B, nw, heads, n, d), lse.view(B, nw, heads, n, 1)
        ctx.save_for_backward(q, k, v, bias, region, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, region, out, lse = ctx.saved_tensors
        B, nw, heads, n, d = q.shape
        delta = (grad * out).sum(-1, keepdim=True)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.zeros_like(bias)
        # windows in chunks whose probabilities fit in cache (about 4 MiB): no n x n tensor is
        # allocated for a whole stage, and exp and products run on cache-resident data
        step = max(1, (4 << 20) // (B * heads * n * n * q.element_size()))
        for w in range(0, nw, step):
            c = slice(w, w + step)
            qc, kc, vc, gc = q[:, c], k[:, c], v[:, c], grad[:, c]
            p = torch.matmul(qc, kc.transpose(-2, -1)).mul_(ctx.scale).add_(bias)
            if region is not None:
                p.add_(region_mask(region[c], q.dtype, -math.inf)[:, None])  # the forward's mask
            # logits more than 80 below the log-sum-exp are set to -inf: their exp would be a
            # float32 denormal, which is slow in exp and in every product after it
            p = F.threshold_(p.sub_(lse[:, c].to(q.dtype)), -80.0, -math.inf).exp_()
            dv[:, c] = torch.matmul(p.transpose(-2, -1), gc)
            ds = torch.matmul(gc, vc.transpose(-2, -1)).sub_(delta[:, c]).mul_(p)
            del p
            dbias += ds.sum((0, 1))
            dq[:, c] = torch.matmul(ds, kc).mul_(ctx.scale)
            dk[:, c] = torch.matmul(ds.transpose(-2, -1), qc).mul_(ctx.scale)
        return dq, dk, dv, dbias, None, None


def window_attention(qkv, table, index, region=None, backend="sdpa"):
    """Multi-head self-attention inside windows with a relative position bias.

    qkv:    (b, n, 3, heads, hd), b = batch * windows (windows batch-major), packed as the
            qkv Linear emits it.
    table:  (2197, heads) relative position bias table.
    index:  (n, n) long, rows of `table` for each (query, key) pair.
    region: (nw, n) int region id of every token of each window (shifted blocks), or None.
            Tokens of different regions get -100 added to their logit (MONAI semantics).
    Returns (b, n, heads * hd).
    backend: "naive" (MONAI's formulation), "sdpa" (PyTorch's fused attention: on CPU with a
    backward that recomputes the probabilities, on CUDA with the bias as attn_mask), "triton"
    (kernels/, CUDA), "auto" (triton on CUDA, else sdpa).
    """
    backend = _resolve_backend(backend, qkv.device)
    if backend == "triton":
        from kernels.window_attention import window_attention_triton

        return window_attention_triton(qkv, table, index, region)
    b, n, _, heads, hd = qkv.shape
    nw = 1 if region is None else region.shape[0]
    q, k, v = rearrange(qkv, "(b w) n three h d -> three b w h n d", w=nw).unbind(0)  # (B, nw, heads, n, d)
    # the gather's backward must be deterministic: on CPU table[index] accumulates with parallel
    # atomic adds (run-to-run rounding differences), index_select's backward does not; on CUDA
    # it is the other way round
    rows = table.index_select(0, index.reshape(-1)) if table.device.type == "cpu" else table[index.reshape(-1)]
    bias = rearrange(rows, "(i j) h -> h i j", i=n)[None]  # (1, heads, n, n)
    if backend == "sdpa" and q.device.type == "cpu":
        out = _BiasedAttention.apply(q, k, v, bias.to(q.dtype), region, hd**-0.5)
        return rearrange(out, "b w h n d -> (b w) n (h d)")
    if region is not None:
        bias = bias + region_mask(region, q.dtype)[:, None]  # (nw, heads, n, n)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    else:
        attn = (q * hd**-0.5) @ k.transpose(-2, -1) + bias
        out = attn.softmax(-1).to(v.dtype) @ v
    return rearrange(out, "b w h n d -> (b w) n (h d)")


def prior_attention(q, k, v, backend="sdpa"):
    """Cross-attention whose keys and values are shared by the whole batch.

    q: (B, heads, L, hd); k, v: (heads, L, hd) (the projected prior). Returns (B, heads, L, hd).
    """
    backend = _resolve_backend(backend, q.device)
    if backend == "triton":
        from kernels.prior_attention import prior_attention_triton

        return prior_attention_triton(q, k, v)
    if backend == "sdpa":
        b = q.shape[0]
        return F.scaled_dot_product_attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return attn.softmax(-1) @ v


# ----------------------------------------------------------------------------------------------
# Swin encoder


def relative_position_index(window=(7, 7, 7)):
    """(n, n) index into the (2w-1)^3 bias table: per-axis offset q - k shifted to >= 0."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (n, n, 3)
    rel = rel + torch.tensor([w - 1 for w in window])
    return rel[..., 0] * (2 * window[1] - 1) * (2 * window[2] - 1) + rel[..., 1] * (2 * window[2] - 1) + rel[..., 2]


def window_and_shift(size, window, shift):
    """A dimension no larger than the window shrinks the window to it and is not shifted."""
    ws = tuple(s if s <= w else w for s, w in zip(size, window))
    sh = tuple(0 if s <= w else t for s, w, t in zip(size, window, shift))
    return ws, sh


def window_partition(x, ws):
    """(b, D, H, W, c) -> (b * windows, ws^3, c), windows batch-major, tokens in (d, h, w) order."""
    return rearrange(x, "b (nd wd) (nh wh) (nw ww) c -> (b nd nh nw) (wd wh ww) c", wd=ws[0], wh=ws[1], ww=ws[2])


def window_reverse(x, ws, dims):
    b, d, h, w = dims
    return rearrange(x, "(b nd nh nw) (wd wh ww) c -> b (nd wd) (nh wh) (nw ww) c",
                     b=b, nd=d // ws[0], nh=h // ws[1], wd=ws[0], wh=ws[1], ww=ws[2])


@lru_cache(maxsize=64)
def shift_regions(dims, ws, sh, device):
    """(windows, n) region id of each token: 27 regions on the padded grid, per axis
    [0, -ws), [-ws, -sh), [-sh, end). Attention between different regions is masked."""
    ids = torch.zeros(dims, dtype=torch.int32)
    cnt = 0
    for sd in (slice(-ws[0]), slice(-ws[0], -sh[0]), slice(-sh[0], None)):
        for shh in (slice(-ws[1]), slice(-ws[1], -sh[1]), slice(-sh[1], None)):
            for sw in (slice(-ws[2]), slice(-ws[2], -sh[2]), slice(-sh[2], None)):
                ids[sd, shh, sw] = cnt
                cnt += 1
    return window_partition(ids[None, ..., None], ws)[..., 0].to(device)


class WindowAttention(nn.Module):
    def __init__(self, dim, heads, window=(7, 7, 7), qkv_bias=True, backend="sdpa"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.relative_position_bias_table = nn.Parameter(torch.zeros(math.prod(2 * w - 1 for w in window), heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, region=None):  # x: (b, n, c)
        n = x.shape[1]
        qkv = rearrange(self.qkv(x), "b n (three h d) -> b n three h d", three=3, h=self.heads)
        # A shrunk window reads the top-left n x n block of the 7^3 index (MONAI does the same).
        index = self.relative_position_index[:n, :n]
        return self.proj(window_attention(qkv, self.relative_position_bias_table, index, region, self.backend))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))


def drop_path(x, p, training):
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, window, shift, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0,
                 backend="sdpa", use_checkpoint=False):
        super().__init__()
        self.window, self.shift, self.drop_path, self.use_checkpoint = window, shift, drop_path, use_checkpoint
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, qkv_bias, backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attend(self, x):  # x: (b, d, h, w, c)
        b, d, h, w, c = x.shape
        ws, sh = window_and_shift((d, h, w), self.window, self.shift)
        x = self.norm1(x)
        # Normalise first, then zero-pad to a window multiple (padded tokens are attended to).
        pads = [(-s) % k for s, k in zip((d, h, w), ws)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        dims = (b, d + pads[0], h + pads[1], w + pads[2])
        region = None
        if any(sh):
            x = torch.roll(x, shifts=[-s for s in sh], dims=(1, 2, 3))
            region = shift_regions(dims[1:], ws, sh, x.device)
        x = window_reverse(self.attn(window_partition(x, ws), region), ws, dims)
        if any(sh):
            x = torch.roll(x, shifts=sh, dims=(1, 2, 3))
        return x[:, :d, :h, :w]

    def feed_forward(self, x):
        return self.mlp(self.norm2(x))

    def forward(self, x):
        run = (lambda f, a: checkpoint(f, a, use_reentrant=False)) if self.use_checkpoint and x.requires_grad else (lambda f, a: f(a))
        x = x + drop_path(run(self.attend, x), self.drop_path, self.training)
        return x + drop_path(run(self.feed_forward, x), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """Concatenate the 8 sub-voxels of every 2^3 cell (order selectable), LayerNorm, Linear 8C -> 2C."""

    def __init__(self, dim, order="monai"):
        super().__init__()
        if order not in MERGING_ORDERS:
            raise ValueError(f"merging order must be one of {list(MERGING_ORDERS)}, got {order!r}")
        self.offsets = MERGING_ORDERS[order]
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(8 * dim)

    def forward(self, x):  # (b, d, h, w, c) -> (b, d/2, h/2, w/2, 2c)
        d, h, w = x.shape[1:4]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2] for i, j, k in self.offsets], -1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    def __init__(self, dim, depth, heads, window, drop_paths, merging, **block_kw):
        super().__init__()
        shift = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, (0, 0, 0) if i % 2 == 0 else shift, drop_path=drop_paths[i], **block_kw)
            for i in range(depth))
        self.downsample = PatchMerging(dim, merging)

    def forward(self, x):  # (b, c, d, h, w) -> (b, 2c, d/2, h/2, w/2)
        x = rearrange(x, "b c d h w -> b d h w c")
        for blk in self.blocks:
            x = blk(x)
        return rearrange(self.downsample(x), "b d h w c -> b c d h w")


class PatchEmbed(nn.Module):
    def __init__(self, in_channels, dim, patch=2):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        pads = [(-s) % self.patch for s in x.shape[2:]]
        return self.proj(F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0])))


def channel_norm(x):
    """LayerNorm over channels without affine, on (b, c, d, h, w)."""
    return rearrange(F.layer_norm(rearrange(x, "b c d h w -> b d h w c"), x.shape[1:2]), "b d h w c -> b c d h w")


class SwinTransformer(nn.Module):
    """Encoder E: patch embedding and four Swin stages. Returns the five layer-normed outputs
    (F, 2F, 4F, 8F, 16F channels at 1/2 .. 1/32 of the input)."""

    def __init__(self, in_chans, embed_dim, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
                 num_heads=(3, 6, 12, 24), mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, merging="monai",
                 backend="sdpa", use_checkpoint=False):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(len(depths)):
            layer = BasicLayer(embed_dim * 2**i, depths[i], num_heads[i], tuple(window_size),
                               dpr[sum(depths[:i]):sum(depths[:i + 1])], merging, mlp_ratio=mlp_ratio,
                               qkv_bias=qkv_bias, backend=backend, use_checkpoint=use_checkpoint)
            self.add_module(f"layers{i + 1}", nn.ModuleList([layer]))

    def forward(self, x):
        x = self.patch_embed(x)
        outs = [channel_norm(x)]
        for layers in (self.layers1, self.layers2, self.layers3, self.layers4):
            x = layers[0](x)
            outs.append(channel_norm(x))
        return outs


# ----------------------------------------------------------------------------------------------
# convolutional encoder/decoder blocks (MONAI UnetResBlock / UnetrUpBlock parity)


class ConvOnly(nn.Module):
    """Holds a conv as `.conv` so parameter names match MONAI's (`conv1.conv.weight`)."""

    def __init__(self, cin, cout, k, transposed=False, bias=False):
        super().__init__()
        if transposed:
            self.conv = nn.ConvTranspose3d(cin, cout, k, stride=k, bias=bias)
        else:
            self.conv = nn.Conv3d(cin, cout, k, padding=k // 2, bias=bias)

    def forward(self, x):
        if self.conv.transposed:
            return self.conv(_channels_last(x))
        return self._convolve(x, self.conv.weight, self.conv.bias)

    def pair(self, a, b):
        """self(torch.cat([a, b], 1)) without storing the concatenation: each part convolved
        with its share of the kernel's input channels, the two summed (equal up to the order of
        the sums). For inference, where the concatenated copy would be the largest tensor."""
        w, k = self.conv.weight, a.shape[1]
        return self._convolve(a, w[:, :k], self.conv.bias).add_(self._convolve(b, w[:, k:], None))

    def _convolve(self, x, weight, bias):
        x = _channels_last(x)
        if self.conv.kernel_size == (1, 1, 1) and x.device.type == "cpu":
            # a 1x1x1 conv on channels-last data is a matrix product over the channel axis
            # (faster than oneDNN's 1x1 conv, backward included)
            return F.linear(x.permute(0, 2, 3, 4, 1), weight.flatten(1), bias).permute(0, 4, 1, 2, 3)
        c = self.conv
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # oneDNN whatever the size: F.conv3d sends a batch-1 input whose N*C*D*H is below
            # 20480 (every conv of stages 1-3 at F=12, roi 64) to its unfold-and-GEMM fallback,
            # several times slower per voxel; the backward is the same kernel either way
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, c.padding, c.stride, c.dilation, c.groups)
        return F.conv3d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)


def _channels_last(x):
    """On CPU, x in oneDNN's own layout (channels-last), so that no conv reorders it."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.device.type == "cpu" else x


class _InstanceNormCL(torch.autograd.Function):
    """Instance norm without affine of one channels-last sample (1, C, D, H, W), kept
    channels-last. F.instance_norm would copy it to NCDHW, and batch norm's channels-last
    statistics accumulate serially in float32 (4e-4 off at 96^3). Here the mean is a cascaded
    sum and the variance sums centred squares in cache-sized chunks; normalising and the
    backward are PyTorch's batch-norm kernels with these statistics."""

    @staticmethod
    def forward(ctx, x, eps):
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])  # a view: (voxels, C)
        mean = rows.sum(0) / rows.shape[0]
        sq = sum((r - mean).square_().sum(0, dtype=torch.float64) for r in rows.split(1 << 15))
        var = (sq / rows.shape[0]).to(x.dtype)
        out = torch.ops.aten.native_batch_norm(x, None, None, mean, var, False, 0.0, eps)[0]
        invstd = (var + eps).rsqrt()
        ctx.save_for_backward(x, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, invstd = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        return torch.ops.aten.native_batch_norm_backward(grad, x, None, None, None, mean, invstd, True, ctx.eps,
                                                         [True, False, False])[0], None


def inorm(x, eps=1e-5):
    """Instance norm without affine (MONAI's InstanceNorm3d), channels-last kept channels-last."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.is_contiguous()
            or not x.is_contiguous(memory_format=torch.channels_last_3d)):
        return F.instance_norm(x, eps=eps)
    if x.shape[0] == 1:
        return _InstanceNormCL.apply(x, eps)
    return torch.cat([_InstanceNormCL.apply(s, eps) for s in x.split(1)])


class ResBlock(nn.Module):
    """conv-IN-LReLU-conv-IN (+ 1x1 conv-IN shortcut when channels change), LReLU."""

    def __init__(self, cin, cout, use_checkpoint=False):
        super().__init__()
        self.conv1, self.conv2 = ConvOnly(cin, cout, 3), ConvOnly(cout, cout, 3)
        self.conv3 = ConvOnly(cin, cout, 1) if cin != cout else None
        self.use_checkpoint = use_checkpoint

    def _forward(self, x):
        out = inorm(self.conv2(F.leaky_relu(inorm(self.conv1(x)), 0.01, inplace=True)))
        res = inorm(self.conv3(x)) if self.conv3 is not None else x
        return F.leaky_relu(out + res, 0.01, inplace=True)

    def pair(self, a, b):
        """self(torch.cat([a, b], 1)) for inference (no gradient) with ConvOnly.pair: the
        concatenation is never stored, the residual is added in place."""
        out = inorm(self.conv2(F.leaky_relu(inorm(self.conv1.pair(a, b)), 0.01, inplace=True)))
        out += inorm(self.conv3.pair(a, b))
        return F.leaky_relu(out, 0.01, inplace=True)

    def forward(self, x):
        if self.use_checkpoint and x.requires_grad:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class EncoderBlock(nn.Module):
    def __init__(self, cin, cout, use_checkpoint=False):
        super().__init__()
        self.layer = ResBlock(cin, cout, use_checkpoint)

    def forward(self, x):
        return self.layer(x)


class UpBlock(nn.Module):
    def __init__(self, cin, cout, use_checkpoint=False):
        super().__init__()
        self.transp_conv = ConvOnly(cin, cout, 2, transposed=True)
        self.conv_block = ResBlock(2 * cout, cout, use_checkpoint)

    def forward(self, x, skip):
        if not torch.is_grad_enabled():  # inference: at full resolution the copy is the peak
            return self.conv_block.pair(self.transp_conv(x), skip)
        return self.conv_block(torch.cat([self.transp_conv(x), skip], 1))


class OutBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvOnly(cin, cout, 1, bias=True)

    def forward(self, x):
        return self.conv(x)


# ----------------------------------------------------------------------------------------------
# networks


class SwinUNETR(nn.Module):
    """Plain Swin UNETR; state dict interchangeable with MONAI SwinUNETR(use_v2=False).

    Forward API used by the training scripts: encode(x) -> (z, skips); decode(z, skips, x).
    """

    def __init__(self, in_channels, out_channels, feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                 window_size=7, dropout_path_rate=0.0, merging="monai", attn_backend="sdpa",
                 use_checkpoint=False):
        super().__init__()
        if feature_size % 12 != 0:
            raise ValueError(f"feature_size must be a multiple of 12 (heads 3..24 share it), got {feature_size}")
        fs = feature_size
        self.in_channels, self.out_channels, self.feature_size = in_channels, out_channels, fs
        self.swinViT = SwinTransformer(in_channels, fs, (window_size,) * 3, (2, 2, 2), depths, num_heads,
                                       drop_path_rate=dropout_path_rate, merging=merging, backend=attn_backend,
                                       use_checkpoint=use_checkpoint)
        ck = use_checkpoint
        self.encoder1 = EncoderBlock(in_channels, fs, ck)
        self.encoder2 = EncoderBlock(fs, fs, ck)
        self.encoder3 = EncoderBlock(2 * fs, 2 * fs, ck)
        self.encoder4 = EncoderBlock(4 * fs, 4 * fs, ck)
        self.encoder10 = EncoderBlock(16 * fs, 16 * fs, ck)
        self.decoder5 = UpBlock(16 * fs, 8 * fs, ck)
        self.decoder4 = UpBlock(8 * fs, 4 * fs, ck)
        self.decoder3 = UpBlock(4 * fs, 2 * fs, ck)
        self.decoder2 = UpBlock(2 * fs, fs, ck)
        self.decoder1 = UpBlock(fs, fs, ck)
        self.out = OutBlock(fs, out_channels)

    @staticmethod
    def check_input(x):
        if x.ndim != 5:
            raise ValueError(f"expected input (batch, channels, D, H, W), got shape {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % 32]
        if bad:
            fix = [s if s % 32 == 0 else 32 * math.ceil(s / 32) for s in x.shape[2:]]
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by 32: pad or crop to e.g. {tuple(fix)}")

    def encode(self, x):
        """x (b, C, D, H, W) -> z (b, 16F, D/32, H/32, W/32), skips [x0..x3]."""
        self.check_input(x)
        *skips, z = self.swinViT(x)
        return z, skips

    def decode(self, z, skips, x):
        """Decoder D: z (or X_h') at 1/32, the encoder skips and the input image -> logits
        (contiguous; on CPU the convolutions run channels-last)."""
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(skips[0])
        enc2 = self.encoder3(skips[1])
        enc3 = self.encoder4(skips[2])
        dec3 = self.decoder5(self.encoder10(z), skips[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0, enc0)).contiguous()

    def forward(self, x):
        z, skips = self.encode(x)
        return self.decode(z, skips, x)


PRIOR_ATTENTION = ("dot", "cosine")
PRIOR_FUSE = ("concat", "residual", "prior")


class PriorAttention(nn.Module):
    """Multi-head cross-attention whose tokens are the 16F channels and whose embedding is the
    flattened bottleneck grid (nn.MultiheadAttention(G, heads, batch_first=True) semantics and
    parameter names).

    logits="dot" is the paper's q k^T / sqrt(d). logits="cosine" is Swin V2's scaled cosine
    attention, cos(q, k) * exp(logit_scale) with one learnable scale per head (init 10, at most
    100), an option: the dot product's softmax over O's 16F tokens stays near its maximum
    entropy in pre-training (docs/results.md), the cosine form selects from the first step."""

    def __init__(self, embed_dim, heads, backend="sdpa", logits="dot"):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"prior attention heads ({heads}) must divide the bottleneck grid size {embed_dim}")
        if logits not in PRIOR_ATTENTION:
            raise ValueError(f"prior attention logits {logits!r}: expected one of {PRIOR_ATTENTION}")
        self.heads, self.backend, self.logits = heads, backend, logits
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        if logits == "cosine":
            self.logit_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0)))
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _qkv(self, query, prior):
        """q, k, v with the logits' scale folded into q, so that every backend computes
        softmax(q k^T / sqrt(d)) v."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = rearrange(F.linear(query, wq, bq), "b l (h d) -> b h l d", h=self.heads)
        k = rearrange(F.linear(prior, wk, bk), "l (h d) -> h l d", h=self.heads)
        v = rearrange(F.linear(prior, wv, bv), "l (h d) -> h l d", h=self.heads)
        if self.logits == "cosine":
            scale = self.logit_scale.clamp(max=math.log(100.0)).exp() * q.shape[-1] ** 0.5
            q, k = F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)
        return q, k, v

    def forward(self, query, prior):  # query: (b, L, E); prior: (L, E)
        out = prior_attention(*self._qkv(query, prior), self.backend)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))

    def probabilities(self, query, prior):
        """The softmax over the channel tokens of O for each channel token of z: (b, heads, L, L)."""
        q, k, _ = self._qkv(query, prior)
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)


class GridHead(nn.Module):
    """Reads the flattened bottleneck grid (so it sees orientation): 1x1 conv 16F -> c, flatten, Linear.
    centred=True first subtracts the grid's mean over its positions (per sample and channel):
    the part of z that a rotation of the grid leaves unchanged, so it tells nothing about the
    rotation, and the part that dominates z at initialisation (docs/method.md, "Where we differ")."""

    def __init__(self, dim, grid, out_features, reduced=32, centred=False):
        super().__init__()
        self.grid, self.centred = tuple(grid), centred
        self.reduce = nn.Conv3d(dim, reduced, 1)
        self.fc = nn.Linear(reduced * math.prod(grid), out_features)

    def forward(self, z):
        if tuple(z.shape[2:]) != self.grid:
            raise ValueError(f"head built for a bottleneck grid {self.grid} (roi {tuple(32 * g for g in self.grid)}), "
                             f"got {tuple(z.shape[2:])}")
        if self.centred:
            z = z - z.mean((2, 3, 4), keepdim=True)
        return self.fc(F.gelu(self.reduce(z)).flatten(1))


PRIOR_BRANCH = ("prior", "prior_attn.", "transfer.", "fuse.")  # parameter names of O, Attn, T, Fuse


class PersonalizedSwinUNETR(SwinUNETR):
    """Swin UNETR with the personalization bottleneck.

    encode(x) -> (z, skips); personalize(z) -> X_h'; decode(X_h', skips, x) -> output.
    equivariance_logits(z) = F_equ(z); embed(z) = g(z) (L2-normalised, proj_dim).
    prior=False removes O, Attn, T and Fuse: X_h' = z (the ablations without prior).
    prior_logits: the prior attention's logits, "dot" (the paper's) or "cosine" (PriorAttention).
    prior_fuse: "concat", the paper's X_h' = Fuse([z, z']); "residual", X_h' = z + Fuse([z, z'])
    (z reaches X_h' whatever the prior branch does); or "prior", X_h' = Fuse([0, z']) (z reaches
    X_h' only through the prior attention). The last two are options, docs/method.md.
    """

    def __init__(self, in_channels, out_channels, feature_size=48, roi=(96, 96, 96), prior=True, prior_heads=3,
                 n_phi=4, proj_dim=512, prior_logits="dot", prior_fuse="concat", **kw):
        super().__init__(in_channels, out_channels, feature_size, **kw)
        roi = (roi,) * 3 if isinstance(roi, int) else tuple(roi)
        if any(r % 32 for r in roi):
            raise ValueError(f"roi {roi} must be divisible by 32")
        if prior_fuse not in PRIOR_FUSE:
            raise ValueError(f"prior fuse {prior_fuse!r}: expected one of {PRIOR_FUSE}")
        self.roi, self.grid, self.use_prior = roi, tuple(r // 32 for r in roi), prior
        self.fuse_form = prior_fuse
        dim, g = 16 * feature_size, math.prod(r // 32 for r in roi)
        if prior:
            self.prior = nn.Parameter(torch.randn(dim, *self.grid))
            self.prior_attn = PriorAttention(g, prior_heads, kw.get("attn_backend", "sdpa"), prior_logits)
            self.transfer = nn.Sequential(nn.Conv3d(dim, dim, 3, padding=1), nn.Conv3d(dim, dim, 3, padding=1))
            self.fuse = nn.Conv3d(2 * dim, dim, 3, padding=1)
        self.equ_head = GridHead(dim, self.grid, n_phi, centred=True)
        self.proj_head = GridHead(dim, self.grid, proj_dim)

    def personalize(self, z):
        """z (b, 16F, g, g, g) -> X_h' = Fuse([z, T(Attn(z, O, O))])."""
        if not self.use_prior:
            return z
        return self._fuse(z, self.prior_branch(z))

    def _fuse(self, z, z2):
        if self.fuse_form == "prior":  # Fuse([0, z']) without convolving the zeros: no route around the prior
            return self.prior_part(z2) + self.fuse.bias.view(1, -1, 1, 1, 1)
        out = self.fuse(torch.cat([z, z2], 1))
        return z + out if self.fuse_form == "residual" else out

    def prior_part(self, z2):
        """"X_h' via z'", the part of X_h' through the prior branch's output z2:
        Fuse([0, z2]) - Fuse([0, 0]), the z' half of Fuse's kernel without its bias (both fuse
        forms)."""
        return F.conv3d(z2, self.fuse.weight[:, z2.shape[1]:], None, padding=self.fuse.padding)

    def personalize_with_part(self, z):
        """(X_h', X_h' via z') from one pass of the prior branch (the option L_pers on the prior's
        part, train_pretrain.py preset 6pz)."""
        z2 = self.prior_branch(z)
        return self._fuse(z, z2), self.prior_part(z2)

    def prior_branch(self, z):
        """z' = T(Attn(z, O, O)), the prior branch's output."""
        if tuple(z.shape[2:]) != self.grid:
            raise ValueError(f"the prior was built for a bottleneck grid {self.grid} (roi {self.roi}); this input gives "
                             f"{tuple(z.shape[2:])} (input {tuple(32 * s for s in z.shape[2:])}): use inputs of the roi "
                             f"size (sliding windows) or build the model with that roi")
        zt = self.prior_attn(z.flatten(2), self.prior.flatten(1))  # (b, 16F, G): channels are tokens
        return self.transfer(zt.reshape(z.shape))

    def representations(self, z):
        """Where person information can be lost, for the mechanism metrics: z, z' (None without
        the prior), X_h', the parts of X_h' through each input of Fuse, "X_h' via z" =
        X_h'(z, 0) - X_h'(0, 0) and "X_h' via z'" = X_h'(0, z') - X_h'(0, 0) (Fuse is a
        convolution, so X_h' is their sum plus a constant; None without the prior), and the prior
        attention's softmax over O's channel tokens (None without)."""
        if not self.use_prior:
            return {"z": z, "z'": None, "X_h'": z, "X_h' via z": None, "X_h' via z'": None, "attention": None}
        z2 = self.prior_branch(z)
        zero = torch.zeros_like(z)
        return {"z": z, "z'": z2, "X_h'": self._fuse(z, z2), "X_h' via z": self._fuse(z, zero) - self._fuse(zero, zero),
                "X_h' via z'": self.prior_part(z2),
                "attention": self.prior_attn.probabilities(z.flatten(2), self.prior.flatten(1))}

    def prior_share(self, z, xh):
        """How much of X_h' the prior branch carries: ||X_h' - Fuse([z, 0])|| / ||X_h'|| (0
        without the prior), no gradient."""
        if not self.use_prior:
            return 0.0
        with torch.no_grad():
            base = self._fuse(z, torch.zeros_like(z))
            return float((xh - base).norm() / xh.norm().clamp_min(1e-12))

    def prior_parameters(self):
        """The parameters of the prior branch (O, Attn, T, Fuse); empty without the prior."""
        return [p for n, p in self.named_parameters() if n.startswith(PRIOR_BRANCH)]

    def equivariance_logits(self, z):
        return self.equ_head(z)

    def embed(self, z):
        return F.normalize(self.proj_head(z), dim=-1)

    def forward(self, x):
        z, skips = self.encode(x)
        return self.decode(self.personalize(z), skips, x)


def build_model(arch):
    """The network of an architecture record (the "arch" entry of every checkpoint): "kind"
    swinunetr or personalized, channels, feature size, roi, prior, prior heads, phi, the
    patch-merging order (records without one were built with "monai"), the prior attention's
    logits and fuse (records without: "dot", "concat"), attention backend and checkpointing. Training builds its network with it and inference rebuilds the
    same network from a checkpoint."""
    kw = dict(feature_size=arch["feature_size"], attn_backend=arch.get("attn_backend", "auto"),
              use_checkpoint=arch.get("checkpointing", False), merging=arch.get("merging", "monai"))
    if arch["kind"] == "swinunetr":
        return SwinUNETR(arch["in_channels"], arch["out_channels"], **kw)
    return PersonalizedSwinUNETR(arch["in_channels"], arch["out_channels"], roi=tuple(arch["roi"]),
                                 prior=arch["prior"], prior_heads=arch["prior_heads"], n_phi=n_phi(arch["phi"]),
                                 prior_logits=arch.get("prior_logits", "dot"),
                                 prior_fuse=arch.get("prior_fuse", "concat"), **kw)


def same_network(a, b):
    """Whether two architecture records build the same network: the attention backend and
    activation checkpointing change how it runs, not what it computes."""
    def network(r):
        return {k: v for k, v in {"merging": "monai", "prior_logits": "dot", "prior_fuse": "concat", **r}.items()
                if k not in ("attn_backend", "checkpointing")}
    return network(a) == network(b)


# ----------------------------------------------------------------------------------------------
# checkpoint loaders


def _unwrap(sd):
    for key in ("state_dict", "model", "net"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def read_state_dict(path_or_sd):
    """A state dict from a path (files.read_checkpoint: weights-only) or a dict."""
    return _unwrap(path_or_sd if isinstance(path_or_sd, dict) else read_checkpoint(path_or_sd))


def load_mapped(model, mapped, name, skip=(), log=print):
    """Copy `mapped` (our names -> tensors) into `model`.

    Every key must exist with the same shape unless it starts with one of `skip` (e.g. a head
    being replaced). Encoder keys (swinViT.*) of the model must all be present. Prints
    matched / missing / unexpected counts; returns a report dict of names: matched, missing (the
    model's tensors left as they were), unexpected, skipped."""
    own = model.state_dict()
    matched, skipped, unexpected, mismatched = [], [], [], []
    for k, v in mapped.items():
        if k not in own:
            (skipped if k.startswith(tuple(skip)) else unexpected).append(k)
        elif own[k].shape != v.shape:
            if k.startswith(tuple(skip)):
                skipped.append(k)
            else:
                mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            matched.append(k)
    missing = [k for k in own if k not in matched]
    missing_encoder = [k for k in missing if k.startswith("swinViT.")]
    log(f"[{name}] matched {len(matched)} / {len(own)} model tensors; missing {len(missing)}; "
        f"unexpected {len(unexpected)}; skipped {len(skipped)}")
    if mismatched or unexpected or missing_encoder:
        problems = mismatched[:3] + [f"unexpected {k}" for k in unexpected[:3]] + [f"missing {k}" for k in missing_encoder[:3]]
        raise ValueError(f"[{name}] checkpoint does not fit the model: {len(mismatched)} shape mismatches, "
                         f"{len(unexpected)} unexpected, {len(missing_encoder)} encoder keys missing; e.g. " + "; ".join(problems))
    with torch.no_grad():
        for k in matched:
            own[k].copy_(mapped[k])
    return {"matched": matched, "missing": missing, "unexpected": unexpected, "skipped": skipped}


def _strip(sd, prefix):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def load_monai(model, path_or_sd, skip=(), log=print):
    """A MONAI SwinUNETR (v1) state dict (optionally under 'state_dict', with 'module.' prefixes)."""
    sd = _strip(read_state_dict(path_or_sd), "module.")
    return load_mapped(model, sd, "monai", skip, log)


def _adapt_patch_embed(w, in_channels, policy):
    """(F, c, 2, 2, 2) weights trained on c channels -> in_channels. 'tile' repeats them and
    divides by the repeat so a single modality repeated on every channel gives the same
    activations; 'reinit' draws new weights."""
    if w.shape[1] == in_channels:
        return w
    if policy == "tile":
        reps = math.ceil(in_channels / w.shape[1])
        return w.repeat(1, reps, 1, 1, 1)[:, :in_channels] * (w.shape[1] / in_channels)
    if policy == "reinit":
        conv = nn.Conv3d(in_channels, w.shape[0], 2, stride=2)
        return conv.weight.detach()
    raise ValueError(f"patch_embed policy must be 'tile' or 'reinit', got {policy!r}")


def load_ssl_swinvit(model, path_or_sd, patch_embed="tile", log=print):
    """Tang et al. 2022 self-supervised encoder weights (`model_swinvit.pt`): encoder only.
    `module.X` -> `swinViT.X`, `mlp.fc1/fc2` -> `mlp.linear1/linear2`; the 1-channel patch
    embedding is adapted by `patch_embed` ('tile' or 'reinit'). Non-encoder keys of the
    self-supervised heads are ignored; every encoder key of the model must be filled."""
    sd = read_state_dict(path_or_sd)
    mapped, ignored = {}, []
    for k, v in sd.items():
        k2 = k[len("module."):] if k.startswith("module.") else k
        k2 = k2.replace("swinViT.", "")
        if not (k2.startswith("patch_embed.") or k2.startswith("layers")):
            ignored.append(k)
            continue
        k2 = "swinViT." + k2.replace("mlp.fc1.", "mlp.linear1.").replace("mlp.fc2.", "mlp.linear2.")
        if k2 == "swinViT.patch_embed.proj.weight":
            v = _adapt_patch_embed(v, model.in_channels, patch_embed)
            log(f"[ssl] patch embedding {tuple(sd[k].shape)} -> {tuple(v.shape)} by '{patch_embed}'")
        mapped[k2] = v
    if ignored:
        log(f"[ssl] ignored {len(ignored)} non-encoder keys (self-supervised heads), e.g. {ignored[0]}")
    report = load_mapped(model, mapped, "ssl", log=log)
    enc = [k for k in model.state_dict() if k.startswith("swinViT.")]
    if set(enc) - set(report["matched"]):
        raise ValueError(f"[ssl] {len(set(enc) - set(report['matched']))} encoder tensors were not filled")
    return report


def fold_fuse(weight):
    """Fuse conv over [z, z', z] (3*C input channels) -> the same function over [z, z']."""
    c = weight.shape[1] // 3
    return torch.cat([weight[:, :c] + weight[:, 2 * c:], weight[:, c:2 * c]], 1)


def load_reference(model, path_or_sd, skip=(), log=print):
    """The reference code's SSLHead checkpoint (swinViT1.*, static_prior, attn_for_x.*,
    tansfer_for_mod.*, fuse_to_X over [z, z', z], encoder*/decoder*/out) into a
    PersonalizedSwinUNETR. Its single-token rotation/contrastive heads, the unused
    attn_for_mod and its auxiliary upsampling decoders have no counterpart here and are
    reported as ignored."""
    sd = _strip(read_state_dict(path_or_sd), "module.")
    rename = (("swinViT1.", "swinViT."), ("attn_for_x.", "prior_attn."), ("tansfer_for_mod.", "transfer."),
              ("fuse_to_X.", "fuse."))
    mapped, ignored = {}, []
    for k, v in sd.items():
        if k.startswith(("attn_for_mod.", "rotation_head.", "contrastive_head.", "rotation_pre", "contrastive_pre",
                         "conv.", "conv2.")):
            ignored.append(k)
            continue
        if k == "static_prior":
            mapped["prior"] = v.reshape(v.shape[1:]) if v.ndim == 5 else v
            continue
        for a, b in rename:
            if k.startswith(a):
                k = b + k[len(a):]
        if k == "fuse.weight" and v.shape[1] == 3 * v.shape[0]:
            v = fold_fuse(v)
        mapped[k] = v
    log(f"[reference] ignored {len(ignored)} keys without a counterpart (attn_for_mod, single-token heads, "
        f"auxiliary decoders)")
    return load_mapped(model, mapped, "reference", skip, log)
