"""kernels/ against the naive PyTorch attention of model.py and MONAI's WindowAttention.

By default the kernels run in Triton's interpreter on the CPU in fp32. KERNELS_ON_GPU=1 runs
the same comparisons compiled on CUDA, in fp32 and bf16, plus larger shapes.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ON_GPU = os.environ.get("KERNELS_ON_GPU") == "1"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import model  # noqa: E402
from kernels import window_attention as wa  # noqa: E402
from kernels.prior_attention import prior_attention_triton  # noqa: E402
from kernels.window_attention import window_attention_triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
INDEX = model.relative_position_index((7, 7, 7))

if ON_GPU and not torch.cuda.is_available():
    raise RuntimeError("KERNELS_ON_GPU=1 but no CUDA device is visible")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def window_case(batch, dims, ws, sh, heads, hd, dtype, deterministic=True, seed=0):
    """Kernel vs naive reference on the windows of a (batch, *dims) grid: output, dqkv, dtable."""
    torch.manual_seed(seed)
    nw = math.prod(d // w for d, w in zip(dims, ws))
    n = math.prod(ws)
    b = batch * nw
    region = model.shift_regions(dims, ws, sh, DEVICE) if any(sh) else None
    # a shrunk window reads the top-left n x n block of the 7^3 index, as in MONAI
    index = INDEX[:n, :n].to(DEVICE)
    qkv = torch.randn(b, n, 3, heads, hd, device=DEVICE).to(dtype).requires_grad_()
    table = torch.randn(2197, heads, device=DEVICE, requires_grad=True)
    grad = torch.randn(b, n, heads * hd, device=DEVICE)

    out = window_attention_triton(qkv, table, index, region, deterministic=deterministic)
    dqkv, dtable = torch.autograd.grad(out, (qkv, table), grad.to(dtype))

    ref_qkv = qkv.detach().float().requires_grad_()
    ref_table = table.detach().clone().requires_grad_()
    ref = model.window_attention(ref_qkv, ref_table, index, region, backend="naive")
    want_dqkv, want_dtable = torch.autograd.grad(ref, (ref_qkv, ref_table), grad)

    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (b, n, heads * hd)
    assert rel_err(out, ref) < tol
    for name, i in (("dq", 0), ("dk", 1), ("dv", 2)):
        assert rel_err(dqkv[:, :, i], want_dqkv[:, :, i]) < tol, name
    assert rel_err(dtable, want_dtable) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_full_no_shift(dtype):
    window_case(batch=2, dims=(7, 7, 7), ws=(7, 7, 7), sh=(0, 0, 0), heads=2, hd=16, dtype=dtype)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_window_full_shift(dtype, deterministic):
    # 2 windows per sample, batch 2: window w of sample s is qkv[s * 2 + w] and uses region[w]
    window_case(batch=2, dims=(14, 7, 7), ws=(7, 7, 7), sh=(3, 3, 3), heads=1, hd=16, dtype=dtype,
                deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_shrunk_6_hd8(dtype):
    # a 6^3 stage grid shrinks the window to 6^3 (n = 216), never shifted; head dim 8 padded to 16
    window_case(batch=2, dims=(6, 6, 6), ws=(6, 6, 6), sh=(0, 0, 0), heads=2, hd=8, dtype=dtype)


@pytest.mark.skipif(not ON_GPU, reason="the compiled kernels at model shapes need a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", [16, 32])
def test_window_stage_shapes_gpu(dtype, hd):
    window_case(batch=2, dims=(28, 28, 28), ws=(7, 7, 7), sh=(3, 3, 3), heads=3, hd=hd, dtype=dtype)


@pytest.mark.skipif(not ON_GPU, reason="atomics are only reordered on a GPU")
def test_window_deterministic_gpu():
    torch.manual_seed(0)
    region = model.shift_regions((28, 28, 28), (7, 7, 7), (3, 3, 3), DEVICE)
    qkv = torch.randn(128, 343, 3, 3, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    table = torch.randn(2197, 3, device=DEVICE, requires_grad=True)
    grads = []
    for _ in range(2):
        out = window_attention_triton(qkv, table, INDEX.to(DEVICE), region, deterministic=True)
        grads.append(torch.autograd.grad(out.float().square().sum(), (qkv, table)))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_window_matches_monai_module():
    """model.WindowAttention with the triton backend vs MONAI's WindowAttention (its own
    compute_mask builds the -100 mask), same weights."""
    from monai.networks.nets.swin_unetr import WindowAttention as MonaiWindowAttention
    from monai.networks.nets.swin_unetr import compute_mask

    torch.manual_seed(1)
    dims, ws, sh, dim, heads = (7, 7, 14), (7, 7, 7), (3, 3, 3), 16, 1
    ref = MonaiWindowAttention(dim, heads, ws, qkv_bias=True).to(DEVICE)
    with torch.no_grad():
        ref.relative_position_bias_table.normal_()
    ours = model.WindowAttention(dim, heads, ws, backend="triton").to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 343, dim, device=DEVICE)  # 2 windows, batch 1
    mask = compute_mask(list(dims), ws, sh, DEVICE)
    want = ref(x, mask)
    got = ours(x, model.shift_regions(dims, ws, sh, DEVICE))
    assert rel_err(got, want) < 1e-4
    (want_table,) = torch.autograd.grad(want.square().sum(), ref.relative_position_bias_table)
    (got_table,) = torch.autograd.grad(got.square().sum(), ours.relative_position_bias_table)
    assert rel_err(got_table, want_table) < 1e-4


def test_swin_block_triton_backend():
    """A shifted SwinBlock reaches the kernel through model.window_attention (lazy import)."""
    torch.manual_seed(2)
    blocks = [model.SwinBlock(16, 1, (7, 7, 7), (3, 3, 3), backend=be).to(DEVICE) for be in ("naive", "triton")]
    blocks[1].load_state_dict(blocks[0].state_dict())
    x = torch.randn(1, 8, 4, 4, 16, device=DEVICE)  # window (7, 4, 4), padded to 2 windows, shifted in depth
    outs, grads = [], []
    for blk in blocks:
        y = blk(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [blk.attn.relative_position_bias_table, blk.attn.qkv.weight]))
    assert rel_err(outs[1], outs[0]) < 1e-4
    for g1, g0 in zip(grads[1], grads[0]):
        assert rel_err(g1, g0) < 1e-4


class ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), tuple(t.shape), t.dtype))
        return out


def test_shift_mask_never_materialised(monkeypatch):
    """With region ids the only (.., n, n) tensors are the per-head bias, its gradient and the
    per-group dBias partial sums: no (windows, n, n) mask, no comparison of region ids in torch."""
    dims, ws, sh, heads, n = (14, 14, 7), (7, 7, 7), (3, 3, 3), 1, 343
    bm, bn, _ = wa.CONFIGS["dbias"][16]
    tiles = math.ceil(n / bm) * math.ceil(n / bn) * heads
    monkeypatch.setattr(wa, "GROUP_PROGRAMS", 3 * tiles)  # 3 groups over 4 windows: uneven groups
    region = model.shift_regions(dims, ws, sh, DEVICE)
    qkv = torch.randn(4, n, 3, heads, 16, device=DEVICE, requires_grad=True)
    table = torch.randn(2197, heads, device=DEVICE, requires_grad=True)
    index = INDEX.to(DEVICE)
    log = ShapeLog()
    with log:
        out = window_attention_triton(qkv, table, index, region, deterministic=True)
        dqkv, dtable = torch.autograd.grad(out.square().sum(), (qkv, table))
    groups = wa.bias_groups(4, heads, n, bm, bn)
    assert groups == 3
    allowed = {(heads, n, n), (n * n, heads), (groups, heads, n, n)}
    square = {shape for _, shape, _ in log.ops if shape[-2:] == (n, n) or (len(shape) == 2 and shape[0] == n * n)}
    assert square <= allowed, square
    assert not [op for op, shape, dtype in log.ops if dtype == torch.bool and math.prod(shape) >= n * n]
    ref_qkv = qkv.detach().requires_grad_()
    ref = model.window_attention(ref_qkv, table, index, region, backend="naive")
    want = torch.autograd.grad(ref.square().sum(), (ref_qkv, table))
    assert rel_err(out, ref) < 1e-4
    assert rel_err(dqkv, want[0]) < 1e-4 and rel_err(dtable, want[1]) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, L", [(1, 768), (2, 192)])
def test_prior_attention_roi96(batch, L, dtype):
    """Queries (B, 3, L, 9) from a (B, L, 27) projection, keys/values (3, L, 9) shared by the
    batch, as PriorAttention builds them at roi 96: L = 16F channel tokens, F = 48 (the paper's)
    and, for a batch of 2, F = 12."""
    torch.manual_seed(batch)
    heads, hd = 3, 9
    x = torch.randn(batch, L, heads * hd, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(heads, L, hd, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(heads, L, hd, device=DEVICE).to(dtype).requires_grad_()
    grad = torch.randn(batch, heads, L, hd, device=DEVICE)
    out = prior_attention_triton(rearrange(x, "b l (h d) -> b h l d", h=heads), k, v)
    got = torch.autograd.grad(out, (x, k, v), grad.to(dtype))

    ref_in = [t.detach().float().requires_grad_() for t in (x, k, v)]
    ref = model.prior_attention(rearrange(ref_in[0], "b l (h d) -> b h l d", h=heads), ref_in[1], ref_in[2],
                                backend="naive")
    want = torch.autograd.grad(ref, ref_in, grad)
    assert out.dtype == dtype and out.shape == (batch, heads, L, hd)
    assert rel_err(out, ref) < TOL[dtype]
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert rel_err(g, w) < TOL[dtype], name


def test_bad_inputs():
    qkv = torch.randn(2, 27, 3, 1, 16, device=DEVICE)
    table = torch.randn(2197, 1, device=DEVICE)
    with pytest.raises(ValueError, match="index"):
        window_attention_triton(qkv, table, INDEX[:8, :8].to(DEVICE))
    with pytest.raises(ValueError, match="region"):
        window_attention_triton(qkv, table, INDEX[:27, :27].to(DEVICE), torch.zeros(3, 27, dtype=torch.int32))
    with pytest.raises(ValueError, match="k, v"):
        prior_attention_triton(torch.randn(1, 3, 8, 9), torch.randn(3, 8, 9), torch.randn(3, 9, 9))


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error path")
def test_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qkv = torch.randn(1, 27, 3, 1, 16)
    with pytest.raises(RuntimeError, match="CUDA"):
        window_attention_triton(qkv, torch.randn(2197, 1), INDEX[:27, :27])


def test_kernels_compile_for_sm80_and_sm90_within_budget():
    """Every kernel at every configuration the model launches (head dims 8 / 16 / 32, bf16, fp16,
    fp32, with and without bias and shift regions, the prior attention) compiled to a cubin for
    sm_80 and sm_90 by Triton's compiler on this CPU: no spills, registers within budget."""
    from kernels import static
    if not static.available():
        pytest.skip("this Triton wheel has no ptxas / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "kernels.static", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout)
    assert len(rows) == len(static.configurations()) == 252
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert all(r["spill_bytes"] == 0 for r in rows)
    assert static.violations(rows) == []
    fwd = [r for r in rows if r["kernel"] in ("fwd", "dq")]
    assert max(r["registers"] for r in fwd) <= 128


@pytest.mark.parametrize("shift", [False, True])
def test_flex_attention_peer_matches_naive(shift):
    """bench.py's FlexAttention window attention (the peer of the Triton kernels) computes the
    naive backend's function (forward; FlexAttention's backward needs a GPU)."""
    import bench
    dims, ws = (14, 14, 7), (7, 7, 7)
    sh = (3, 3, 3) if shift else (0, 0, 0)
    n, heads, nw = 343, 2, 4
    region = model.shift_regions(dims, ws, sh, torch.device("cpu")) if shift else None
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2 * nw, n, 3, heads, 16, generator=g)
    table = torch.randn(2197, heads, generator=g)
    index = INDEX
    got = bench.flex_window_attention(qkv, table, index, region)
    want = model.window_attention(qkv, table, index, region, backend="naive")
    assert got.shape == want.shape and rel_err(got, want) < 1e-5
