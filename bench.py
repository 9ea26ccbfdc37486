"""Benchmarks: our code and its peer (MONAI, scikit-image, PyTorch SDPA) in the same run.

    python bench.py model | data | prepare | metrics | pretrain | downstream | predict | kernels | steps [--quick]
                    [--static] [--against REV] [--write docs/benchmarks.md]

Every benchmark prints a table with both sides and their ratio (ours / peer). Times are the
median of several runs after warm-up; peak memory is measured in a fresh subprocess per side
(peak RSS on CPU, torch.cuda.max_memory_allocated on GPU), so the two sides cannot pollute
each other. Timed tests are never part of the test suite: numbers come from here only.
--write FILE replaces the section `bench-NAME` (`bench-kernels-static` for --static) of a
Markdown file with what the run printed, so the docs quote no number a rerun would not refresh.
"""
import argparse
import contextlib
import io
import math
import sys
import time
from pathlib import Path

import torch

from measure import (GPU_PEAK, peak_since, reset_peak, in_fresh_process, median_time, median_times, peak_memory_mb,
                     pretrain_step_flops, print_table)


# ---- benchmarks (bench_<name>(args) functions) ----

def _model_pair(fs, size, in_ch=4, out_ch=3):
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    import model

    torch.manual_seed(0)
    peer = MonaiSwinUNETR(in_channels=in_ch, out_channels=out_ch, feature_size=fs)
    ours = model.SwinUNETR(in_ch, out_ch, feature_size=fs, attn_backend="sdpa")
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(1, in_ch, *size)
    return ours, peer, x


def _train_step(net, x, opt):
    opt.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
    opt.step()


def _bench_model_peak(which, fs, size, train):
    ours, peer, x = _model_pair(fs, size)
    net = ours if which == "ours" else peer
    if train:
        _train_step(net, x, torch.optim.AdamW(net.parameters(), lr=1e-4))
    else:
        with torch.no_grad():
            net(x)


def bench_model(args):
    """Forward and train-step (forward, backward, AdamW) time and peak memory of
    model.SwinUNETR vs MONAI SwinUNETR with the same weights and input."""
    configs = [(48, (96, 96, 96))] if not args.quick else [(24, (64, 64, 64))]
    repeats = 2 if args.quick else 5
    rows = []
    for fs, size in configs:
        ours, peer, x = _model_pair(fs, size)
        with torch.no_grad():
            diff = (ours(x) - peer(x)).abs().max().item()
        for phase in ("forward", "train step"):
            fns = {}
            for name, net in (("ours", ours), ("monai", peer)):
                if phase == "forward":
                    def fn(net=net):
                        with torch.no_grad():
                            net(x)
                else:
                    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
                    fn = lambda net=net, opt=opt: _train_step(net, x, opt)
                fns[name] = fn
            res = median_times(fns, repeats=repeats)
            mem = {name: peak_memory_mb(_bench_model_peak, name, fs, size, phase != "forward") for name in ("ours", "monai")}
            rows.append({"config": f"F={fs} {'x'.join(map(str, size))} b=1", "phase": phase,
                         "ours s": res["ours"], "monai s": res["monai"], "time ratio": res["ours"] / res["monai"],
                         "ours MiB": mem["ours"], "monai MiB": mem["monai"], "mem ratio": mem["ours"] / mem["monai"]})
        print(f"max |ours - monai| output difference, F={fs}: {diff:.2e}")
    print_table("model: ours vs MONAI SwinUNETR (median of runs; ratio = ours / monai)", rows,
                ["config", "phase", "ours s", "monai s", "time ratio", "ours MiB", "monai MiB", "mem ratio"])


def flex_window_attention(qkv, table, index, region=None, compiled=None):
    """Window attention with PyTorch FlexAttention, the peer a user would pick instead of the
    Triton kernels: the relative position bias as score_mod, shift regions as MONAI's -100 in the
    same score_mod (a block mask would give -inf, another function). Same contract as
    model.window_attention. On CPU only its forward runs (eager); on GPU pass
    compiled=torch.compile(flex_attention)."""
    from torch.nn.attention.flex_attention import flex_attention

    b, n, _, heads, hd = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (b, heads, n, hd)
    bias = table[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)  # (heads, n, n)
    nw = 1 if region is None else region.shape[0]

    def score_mod(score, bi, h, qi, ki):
        score = score + bias[h, qi, ki].to(score.dtype)
        if region is not None:
            w = bi % nw
            score = score + torch.where(region[w, qi] != region[w, ki], -100.0, 0.0).to(score.dtype)
        return score

    out = (compiled or flex_attention)(q, k, v, score_mod=score_mod)
    return out.transpose(1, 2).reshape(b, n, heads * hd)


def bench_kernels(args):
    """Fused Triton window attention vs PyTorch SDPA with the bias as attn_mask (memory-efficient
    backend) and the naive MONAI-style attention, at the Swin stage shapes of 96^3 and 128^3
    inputs (feature size 48, bf16, shifted windows where the stage is shifted); then the prior
    cross-attention at roi 96 and the peak memory of a SwinUNETR train step at 128^3."""
    if args.static:
        from kernels import static
        if not static.available():
            raise SystemExit("this Triton wheel has no ptxas / cuobjdump: cannot build cubins here")
        rows = static.table()
        print("## Triton kernels compiled for sm_80 and sm_90 on this CPU (worst case over bf16 / fp16 / fp32, "
              "with and without bias and shift regions)\n")
        print(static.markdown(rows))
        bad = static.violations(rows)
        print(f"{len(rows)} cubins; {len(bad)} outside the budget or its exceptions; "
              f"exceptions: {static.EXCEPTIONS}")
        return
    if not torch.cuda.is_available():
        print("GPU timing needs a GPU: no CUDA device here. On CPU the kernels run only in Triton's "
              "interpreter (TRITON_INTERPRET=1, see tests/test_kernels.py); the model uses attn_backend='sdpa'.")
        return
    import math

    import model
    from kernels.prior_attention import prior_attention_triton
    from kernels.window_attention import window_attention_triton

    dev, dtype = torch.device("cuda"), torch.bfloat16
    repeats = 3 if args.quick else 10
    batches = (1, 4) if args.quick else (1, 2, 3, 4)

    def timed(fn):
        try:
            return median_time(fn, repeats, warmup=2) * 1e3
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return float("nan")
        except Exception as e:  # a peer that cannot run this case (e.g. a compile error) is reported, not fatal
            print(f"skipped: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            return float("nan")

    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    window_impls = {
        "triton": window_attention_triton,
        "flex": lambda qkv, t, i, r: flex_window_attention(qkv, t, i, r, compiled=flex),
        "sdpa": lambda qkv, t, i, r: model.window_attention(qkv, t, i, r, backend="sdpa"),
        "naive": lambda qkv, t, i, r: model.window_attention(qkv, t, i, r, backend="naive"),
    }
    fwd_rows, bwd_rows = [], []
    for size in (96, 128):
        for stage, heads in enumerate((3, 6, 12, 24)):
            r = size // 2 ** (stage + 1)  # stage grid: patch 2, then one merge per stage
            ws, sh = model.window_and_shift((r,) * 3, (7, 7, 7), (3, 3, 3))
            padded = tuple(math.ceil(r / w) * w for w in ws)
            nw, n, hd = math.prod(p // w for p, w in zip(padded, ws)), math.prod(ws), 16
            region = model.shift_regions(padded, ws, sh, dev) if any(sh) else None
            index = model.relative_position_index((7, 7, 7))[:n, :n].to(dev)
            for batch in batches:
                b = batch * nw
                qkv = torch.randn(b, n, 3, heads, hd, device=dev, dtype=dtype, requires_grad=True)
                table = (0.02 * torch.randn(2197, heads, device=dev)).requires_grad_()
                dout = torch.randn(b, n, heads * hd, device=dev, dtype=dtype)
                flops = 4 * b * heads * n * n * hd  # QK^T and PV; backward counted as 2.5x forward
                act = b * n * heads * hd * 2  # bytes of one (b, n, C) bf16 tensor
                io = {"fwd": 4 * act, "fwd+bwd": 4 * act + 8 * act}  # qkv + out; then qkv, out, dout, dqkv
                row = {"fwd": {}, "fwd+bwd": {}}
                for name, fn in window_impls.items():
                    with torch.no_grad():
                        row["fwd"][name] = timed(lambda: fn(qkv, table, index, region))
                    row["fwd+bwd"][name] = timed(
                        lambda: torch.autograd.grad(fn(qkv, table, index, region), (qkv, table), dout))
                for kind, rows, f in (("fwd", fwd_rows, flops), ("fwd+bwd", bwd_rows, 3.5 * flops)):
                    ms = row[kind]
                    rows.append({"input": f"{size}^3", "stage": stage + 1, "batch": batch,
                                 "windows x n": f"{b} x {n}", "heads": heads,
                                 "triton ms": ms["triton"], "flex ms": ms["flex"], "sdpa ms": ms["sdpa"],
                                 "naive ms": ms["naive"], "triton/flex": ms["triton"] / ms["flex"],
                                 "triton/sdpa": ms["triton"] / ms["sdpa"], "triton/naive": ms["triton"] / ms["naive"],
                                 "triton TFLOP/s": f / ms["triton"] / 1e9, "sdpa TFLOP/s": f / ms["sdpa"] / 1e9,
                                 "naive TFLOP/s": f / ms["naive"] / 1e9, "triton GB/s": io[kind] / ms["triton"] / 1e6})
                del qkv, table, dout
                torch.cuda.empty_cache()
    cols = ["input", "stage", "batch", "windows x n", "heads", "triton ms", "flex ms", "sdpa ms", "naive ms",
            "triton/flex", "triton/sdpa", "triton/naive", "triton TFLOP/s", "sdpa TFLOP/s", "naive TFLOP/s",
            "triton GB/s"]
    print_table("window attention forward, bf16 (ratio < 1: triton faster)", fwd_rows, cols)
    print_table("window attention forward + backward (dqkv, dtable), bf16", bwd_rows, cols)

    prior_rows = []
    heads, L, hd = 3, 768, 9
    prior_impls = {"triton": prior_attention_triton,
                   "sdpa": lambda q, k, v: model.prior_attention(q, k, v, backend="sdpa"),
                   "naive": lambda q, k, v: model.prior_attention(q, k, v, backend="naive")}
    for batch in batches:
        q = torch.randn(batch, heads, L, hd, device=dev, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(heads, L, hd, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        dout = torch.randn(batch, heads, L, hd, device=dev, dtype=dtype)
        ms = {name: timed(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)) for name, fn in prior_impls.items()}
        prior_rows.append({"batch": batch, "triton ms": ms["triton"], "sdpa ms": ms["sdpa"], "naive ms": ms["naive"],
                           "triton/sdpa": ms["triton"] / ms["sdpa"], "triton/naive": ms["triton"] / ms["naive"]})
    print_table("prior attention forward + backward at roi 96 (B x 3 x 768 x 9, shared k/v), bf16", prior_rows,
                ["batch", "triton ms", "sdpa ms", "naive ms", "triton/sdpa", "triton/naive"])

    size = 96 if args.quick else 128
    mem_rows = []
    for backend in ("triton", "sdpa", "naive"):
        mem_rows.append({"attn_backend": backend, "peak MiB": peak_memory_mb(_kernels_train_step, backend, size, 2)})
    for r in mem_rows:
        r["/ naive"] = r["peak MiB"] / mem_rows[-1]["peak MiB"]
    print_table(f"SwinUNETR(1, 2, feature_size=48) train step at {size}^3, batch 1, bf16 autocast: peak CUDA memory",
                mem_rows, ["attn_backend", "peak MiB", "/ naive"])


def _kernels_train_step(backend, size, steps):
    """Forward, cross-entropy, backward and AdamW step of SwinUNETR (for peak_memory_mb)."""
    import torch.nn.functional as F

    import model

    torch.manual_seed(0)
    try:
        net = model.SwinUNETR(1, 2, feature_size=48, attn_backend=backend).cuda()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(1, 1, size, size, size, device="cuda")
        y = torch.randint(0, 2, (1, size, size, size), device="cuda")
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the parent waits for a number: report, do not die
        print(f"train step with attn_backend={backend} failed ({type(e).__name__}: {e}); its peak below is partial")


def bench_data(args):
    """The data layer at the real data sets' size (bench_data.py): preprocessing against MONAI,
    the cache formats, and the DataLoader workers a GPU needs."""
    import bench_data

    bench_data.bench_data(args)


def bench_prepare(args):
    """A full-size dry run of `data.py prepare` (bench_data.py): a sample, extrapolated."""
    import bench_data

    bench_data.bench_prepare(args)


# metrics benchmark: 3-D SSIM vs scikit-image, HD95 vs MONAI, 18-connected components vs scipy
def _metrics_ssim_ours(a, b, data_range):
    import metrics
    return metrics.ssim3d(a, b, data_range)


def _metrics_ssim_skimage(a, b, data_range):
    from skimage.metrics import structural_similarity
    return structural_similarity(a, b, data_range=data_range)


def bench_metrics(args):
    """3-D SSIM of a 240x240x155 pair (BraTS size) against scikit-image in the same run, on
    float32 and float64 inputs (ours computes in float32 with centred sums by default, or in
    float64); HD95 of two tumour-sized masks against MONAI; 18-connected components against
    scipy.ndimage.label. Ratio = ours / peer time (below 1: ours is faster)."""
    import warnings

    import numpy as np
    from monai.metrics import compute_hausdorff_distance
    from scipy import ndimage
    from skimage.metrics import structural_similarity

    import metrics

    shape = (120, 120, 78) if args.quick else (240, 240, 155)
    repeats = 2 if args.quick else 3
    rng = np.random.default_rng(0)
    gt = rng.standard_normal(shape).astype(np.float32)
    pred = (0.8 * gt + 0.4 * rng.standard_normal(shape)).astype(np.float32)
    rows = []
    for dtype in (np.float32, np.float64):
        a, b = pred.astype(dtype), gt.astype(dtype)
        r = float(max(np.ptp(a), np.ptp(b)))
        ref = structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=r)
        fns = {"skimage": lambda: structural_similarity(a, b, data_range=r)}
        for compute in (torch.float32, torch.float64):
            fns[compute] = lambda compute=compute: metrics.ssim3d(a, b, r, dtype=compute)
        times = median_times(fns, 2 * repeats + 1)  # in turn: a change of machine load hits all alike
        t_sk = times.pop("skimage")
        for compute, t in times.items():
            v = metrics.ssim3d(a, b, r, dtype=compute)
            rows.append({"metric": f"SSIM {np.dtype(dtype).name} input, ours in {str(compute)[6:]}", "ours_s": t,
                         "peer": "skimage", "peer_s": t_sk, "ratio": t / t_sk, "speedup": t_sk / t,
                         "abs_diff": abs(v - ref)})
    if not args.quick:
        a, b = pred, gt
        r = float(max(np.ptp(a), np.ptp(b)))
        rows.append({"metric": "SSIM peak memory MiB (float32)", "ours_s": peak_memory_mb(_metrics_ssim_ours, a, b, r),
                     "peer": "skimage", "peer_s": peak_memory_mb(_metrics_ssim_skimage, a, b, r), "ratio": "",
                     "speedup": "", "abs_diff": ""})
        rows[-1]["ratio"] = rows[-1]["ours_s"] / rows[-1]["peer_s"]

    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape) / 2
    ell = lambda c, rad: sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, rad)) <= 1
    g_mask = ell(centre, np.array(shape) / 6)
    p_mask = ell(centre + 2, np.array(shape) / 6.3) | (rng.random(shape) > 0.99995)
    spacing = [1.0, 1.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = lambda x: torch.from_numpy(x)[None, None].float()
        ref = compute_hausdorff_distance(tm(p_mask), tm(g_mask), include_background=True, percentile=95, spacing=spacing).item()
        t_peer = median_time(lambda: compute_hausdorff_distance(tm(p_mask), tm(g_mask), include_background=True,
                                                                percentile=95, spacing=spacing), repeats)
    v = metrics.hd95(p_mask, g_mask, spacing)
    t = median_time(lambda: metrics.hd95(p_mask, g_mask, spacing), repeats)
    rows.append({"metric": "HD95 (tumour-sized masks)", "ours_s": t, "peer": "MONAI", "peer_s": t_peer,
                 "ratio": t / t_peer, "speedup": t_peer / t, "abs_diff": abs(v - ref)})

    lesions = rng.random(shape) > 0.9995
    lesions = ndimage.binary_dilation(lesions, iterations=2)
    structure = ndimage.generate_binary_structure(3, 2)
    n_ref = ndimage.label(lesions, structure)[1]
    n = metrics.connected_components(lesions, 18)[1]
    t = median_time(lambda: metrics.connected_components(lesions, 18), repeats)
    t_peer = median_time(lambda: ndimage.label(lesions, structure), repeats)
    rows.append({"metric": f"18-conn. components ({n} lesions)", "ours_s": t, "peer": "scipy", "peer_s": t_peer,
                 "ratio": t / t_peer, "speedup": t_peer / t, "abs_diff": float(abs(n - n_ref))})
    print_table(f"metrics on a {shape[0]}x{shape[1]}x{shape[2]} volume (seconds; abs_diff vs the peer's value)",
                rows, ["metric", "ours_s", "peer", "peer_s", "ratio", "speedup", "abs_diff"])


def _reference_ssl_head(nm, fs, roi):
    """The reference code's SSLHead re-created on MONAI modules: MONAI SwinTransformer encoder,
    static prior, nn.MultiheadAttention over the flattened grid, two 3x3x3 convs, a fuse conv over
    [z, z', z], single-token rotation / contrastive heads and MONAI SwinUNETR's decoder."""
    import torch.nn as nn
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    dim, g = 16 * fs, (roi // 32) ** 3

    class SSLHead(nn.Module):
        def __init__(self):
            super().__init__()
            base = MonaiSwinUNETR(in_channels=nm, out_channels=nm, feature_size=fs)
            self.swinViT1 = base.swinViT
            self.static_prior = nn.Parameter(torch.randn(1, dim, *(3 * [roi // 32])))
            self.fuse_to_X = nn.Conv3d(3 * dim, dim, 3, padding=1)
            self.attn_for_x = nn.MultiheadAttention(g, 2 if g % 3 else 3, batch_first=True)
            self.tansfer_for_mod = nn.Sequential(nn.Conv3d(dim, dim, 3, padding=1), nn.Conv3d(dim, dim, 3, padding=1))
            self.rotation_head, self.contrastive_head = nn.Linear(dim, 4), nn.Linear(dim, 512)
            for name in ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4",
                         "decoder3", "decoder2", "decoder1", "out"):
                setattr(self, name, getattr(base, name))

        def forward(self, x):
            h = self.swinViT1(x, True)
            s = h[4]
            prior = self.static_prior.expand(len(s), -1, -1, -1, -1).flatten(2)
            xo = self.attn_for_x(s.flatten(2), prior, prior)[0].reshape(s.shape)
            s = self.fuse_to_X(torch.cat([s, self.tansfer_for_mod(xo), s], 1))
            dec3 = self.decoder5(self.encoder10(s), h[3])
            dec2 = self.decoder4(dec3, self.encoder4(h[2]))
            dec1 = self.decoder3(dec2, self.encoder3(h[1]))
            dec0 = self.decoder2(dec1, self.encoder2(h[0]))
            out = self.out(self.decoder1(dec0, self.encoder1(x)))
            tokens = s.flatten(2).transpose(1, 2)
            return self.rotation_head(tokens[:, 0]), self.contrastive_head(tokens[:, 1]), s, out

    return SSLHead()


def _reference_step(net, opt, x, fg, gen):
    """One person-batch of the reference trainer: per modality a full forward with gradient, a
    full forward of a second view without, losses, backward and an optimizer step."""
    import torch.nn.functional as F

    import sampling

    anchor = None
    for i in torch.randperm(x.shape[1], generator=gen).tolist():
        k = int(torch.randint(4, (), generator=gen))
        x1 = sampling.phi(x[:, i:i + 1].repeat(1, x.shape[1], 1, 1, 1), k)
        rot, con, sem, out = net(sampling.augment(x1, gen))
        with torch.no_grad():
            _, con2, _, _ = net(sampling.augment(sampling.phi(x1, int(torch.randint(4, (), generator=gen))), gen))
        loss = F.cross_entropy(rot, torch.tensor([k])) + F.cross_entropy(
            (F.normalize(con, dim=1) @ F.normalize(con2, dim=1).t()) / 0.1, torch.zeros(1, dtype=torch.long))
        out = sampling.phi_inverse(out, k)
        loss = loss + 10 * ((out - x) ** 2 * fg).sum() / fg.sum() / x.shape[1] + F.mse_loss(out, x)
        if anchor is not None:
            loss = loss + F.mse_loss(sem, anchor)
            anchor = ((anchor + sem) / 2).detach()
        else:
            anchor = sem.detach()
        loss.backward()
        opt.step()


def _pretrain_setup(which, fs, roi):
    import numpy as np

    import model
    import sampling
    import train_pretrain

    torch.manual_seed(0)
    nm = 4
    x = torch.randn(1, nm, roi, roi, roi)
    fg = torch.ones(1, 1, roi, roi, roi, dtype=torch.bool)
    if which == "ours":
        net = model.PersonalizedSwinUNETR(nm, nm, feature_size=fs, roi=(roi,) * 3, prior_heads=2 if (roi // 32) ** 3 % 3 else 3)
        cfg = train_pretrain.Config(roi=str(roi), feature_size=fs)
        use = {**train_pretrain.PRESETS["full"], "decom": True}
        opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            rngs = [np.random.default_rng(0)]
            gens = [torch.Generator().manual_seed(0)]
            anchor = None
            for i in range(nm):
                terms, anchor, _ = train_pretrain.modality_step(net, x, fg, i, rngs, gens, cfg, use, anchor,
                                                                sampling.n_phi())
                sum(terms.values()).backward()
            opt.step()
    else:
        net = _reference_ssl_head(nm, fs, roi)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=1e-5)
        gen = torch.Generator().manual_seed(0)

        def step():
            for p in net.parameters():
                p.grad = None
            _reference_step(net, opt, x, fg, gen)
    return step


def _pretrain_peak(which, fs, roi):
    _pretrain_setup(which, fs, roi)()


def bench_pretrain(args):
    """One full pre-training step (4 modalities, all views, backward, optimizer) of
    train_pretrain vs the reference trainer's step on MONAI SwinUNETR + the reference bottleneck."""
    fs, roi = (12, 64) if args.quick else (24, 64)
    repeats = 2 if args.quick else 3
    res = {w: median_time(_pretrain_setup(w, fs, roi), repeats=repeats) for w in ("ours", "reference")}
    mem = {w: peak_memory_mb(_pretrain_peak, w, fs, roi) for w in ("ours", "reference")}
    print_table(f"pre-training step, F={fs}, roi {roi}^3, 4 modalities, batch 1 (ratio = ours / reference)",
                [{"ours s": res["ours"], "reference s": res["reference"], "time ratio": res["ours"] / res["reference"],
                  "ours MiB": mem["ours"], "reference MiB": mem["reference"], "mem ratio": mem["ours"] / mem["reference"]}],
                ["ours s", "reference s", "time ratio", "ours MiB", "reference MiB", "mem ratio"])


# downstream benchmark: Algorithm-2 tuning step vs one summed backward; 15-subset inference in one pass
# One pre-training step (full preset, 4 modalities with their views, backward, AdamW), timed in a
# fresh process from the code of a folder: this checkout, or another commit's worktree. It uses
# only train_pretrain.modality_step and the model's constructor, which both sides have.
_STEP = """
import math, sys, time
import numpy as np, torch
import model, sampling, train_pretrain
fs, roi = {fs}, {roi}
torch.manual_seed(0)
x, fg = torch.randn(1, 4, *roi), torch.ones(1, 1, *roi, dtype=torch.bool)
grid = math.prod(r // 32 for r in roi)
net = model.PersonalizedSwinUNETR(4, 4, feature_size=fs, roi=roi, prior_heads=3 if grid % 3 == 0 else 2)
cfg = train_pretrain.Config(roi=",".join(map(str, roi)), feature_size=fs)
use = {{**train_pretrain.PRESETS["full"], "decom": True}}
opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=1e-5)
def step():
    opt.zero_grad(set_to_none=True)
    rngs, gens, anchor = [np.random.default_rng(0)], [torch.Generator().manual_seed(0)], None
    for i in range(4):
        terms, anchor, _ = train_pretrain.modality_step(net, x, fg, i, rngs, gens, cfg, use, anchor, sampling.n_phi())
        sum(terms.values()).backward()
    opt.step()
step()
t = time.perf_counter()
step()
print(time.perf_counter() - t)
"""
STEP_GEOMETRIES = [((32, 64, 64), 12), ((32, 64, 64), 24), ((64, 64, 64), 12), ((64, 64, 64), 24),
                   ((96, 96, 96), 12), ((96, 96, 96), 24)]


def _step_seconds(folder, fs, roi):
    import subprocess

    run = subprocess.run([sys.executable, "-c", _STEP.format(fs=fs, roi=tuple(roi))], cwd=folder, capture_output=True,
                         text=True)
    if run.returncode:
        raise SystemExit(f"pre-training step in {folder} failed: {run.stderr.strip().splitlines()[-1]}")
    return float(run.stdout.split()[-1])


def bench_steps(args):
    """The pre-training step at every geometry (roi 32x64x64, 64^3, 96^3; F=12, 24): seconds per
    step of this checkout and, with --against REV, of that commit (a temporary git worktree),
    each in a fresh process, the two in turn at each geometry."""
    import subprocess
    import tempfile

    here = Path(__file__).resolve().parent
    geometries = STEP_GEOMETRIES[::2][:2] if args.quick else STEP_GEOMETRIES
    with contextlib.ExitStack() as stack:
        base = None
        if args.against:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "base"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.against], cwd=here, check=True)
            stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(base)], cwd=here)
        rows = []
        for roi, fs in geometries:
            grid = "x".join(str(r // 32) for r in roi)
            row = {"roi": "x".join(map(str, roi)), "F": fs, "bottleneck grid": grid,
                   "token values": math.prod(r // 32 for r in roi), "s / step": _step_seconds(here, fs, roi)}
            if base is not None:
                row[f"s / step at {args.against}"] = _step_seconds(base, fs, roi)
                row["ratio"] = row["s / step"] / row[f"s / step at {args.against}"]
            rows.append(row)
            print(f"roi {row['roi']}, F={fs}: {row['s / step']:.1f} s", file=sys.stderr, flush=True)
    print_table("pre-training step, full preset, 4 modalities with their views, batch 1, one process "
                "(ratio < 1: this checkout faster)", rows, list(rows[0]))


BRATS2021_CASES = 1251


def bench_flops(args):
    """FLOPs of a pre-training step at every geometry and at the paper's (F=48, roi 96^3), and
    the GPU time they imply: at the bf16 peak, and at the utilisation --mfu; an epoch of BraTS
    2021's training persons (60% of its cases, the default split) at batch 1 per GPU."""
    rows = []
    train = round(0.6 * BRATS2021_CASES)
    for roi, fs in [*STEP_GEOMETRIES, ((96, 96, 96), 48)]:
        flops = pretrain_step_flops(fs, roi)
        for gpu, peak in GPU_PEAK.items():
            at_peak = flops / (peak * 1e12)
            rows.append({"roi": "x".join(map(str, roi)), "F": fs, "TFLOP / step": flops / 1e12, "GPU": gpu,
                         "ms / step at peak": 1e3 * at_peak, f"ms / step at {args.mfu:.0%}": 1e3 * at_peak / args.mfu,
                         f"min / epoch ({train} persons) at {args.mfu:.0%}": train * at_peak / args.mfu / 60})
    print_table("pre-training step FLOPs (torch.utils.flop_counter) and the GPU time they imply, one GPU", rows,
                list(rows[0]))


def _downstream_prior_heads(roi):
    g = (roi[0] // 32) * (roi[1] // 32) * (roi[2] // 32)
    return 3 if g % 3 == 0 else 2


def _downstream_setup(which, fs, roi):
    """A tuning step of Algorithm 2 (4 inputs, segmentation, batch 1): ours frees each decoder
    graph by its own backward; the peer sums every term and runs one backward."""
    import numpy as np

    import inference as I
    import losses
    import model
    import runtime as R
    import train_downstream as T

    torch.manual_seed(0)
    nm = 4
    net = model.PersonalizedSwinUNETR(nm, 3, feature_size=fs, roi=roi, prior_heads=_downstream_prior_heads(roi))
    x = torch.randn(1, nm, *roi)
    batch = {"image": x, "regions": (torch.rand(1, 3, *roi) > 0.9).float()}
    cfg, d, order, w = T.Config(task="seg"), R.Dist(), np.arange(nm), torch.ones(nm, 1)

    def ours():
        net.zero_grad(set_to_none=True)
        T.tuning_step(net, x, batch, cfg, list(range(nm)), [], order, w, d)

    def one_backward():
        net.zero_grad(set_to_none=True)
        feats, anchor, total = [], None, 0.0
        for i in order:
            u = I.single(x, i)
            xh, skips = I.encode(net, u)
            feats.append((xh, skips, u))
            total = total + losses.seg_loss(net.decode(xh, skips, u), batch["regions"]) + losses.invariance_loss(xh, anchor)
            anchor = losses.update_anchor(anchor, xh)
        total = total + losses.seg_loss(net.decode(*I.fuse(feats, w)), batch["regions"])
        total.backward()

    return net, ours if which == "ours" else one_backward


def _downstream_peak(which, fs, roi):
    _downstream_setup(which, fs, roi)[1]()


def _downstream_grads(which, fs, roi):
    net, step = _downstream_setup(which, fs, roi)
    step()
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def bench_downstream(args):
    """train_downstream: one tuning step (4 inputs + the fused path, backward) against one
    backward of the summed objective (same gradients, every decoder graph alive at once), and
    whole-volume inference of the 15 BraTS subsets in one sliding-window pass (each modality
    encoded once per window) against 15 separate passes."""
    import inference as I
    import model

    fs, roi = (12, (32, 32, 64)) if args.quick else (24, (96, 96, 96))
    repeats = 2 if args.quick else 3
    t = {w: median_time(_downstream_setup(w, fs, roi)[1], repeats=repeats) for w in ("ours", "peer")}
    mem = {w: peak_memory_mb(_downstream_peak, w, fs, roi) for w in ("ours", "peer")}
    diff = (_downstream_grads("ours", fs, roi) - _downstream_grads("peer", fs, roi)).abs().max().item()
    print_table(f"tuning step, F={fs}, roi {roi}, 4 inputs + fused path, batch 1 (peer: one backward of the sum)",
                [{"ours s": t["ours"], "peer s": t["peer"], "time ratio": t["ours"] / t["peer"], "ours MiB": mem["ours"],
                  "peer MiB": mem["peer"], "mem ratio": mem["ours"] / mem["peer"], "max |grad diff|": diff}],
                ["ours s", "peer s", "time ratio", "ours MiB", "peer MiB", "mem ratio", "max |grad diff|"])

    torch.manual_seed(0)
    net = model.PersonalizedSwinUNETR(4, 3, feature_size=fs, roi=roi, prior_heads=_downstream_prior_heads(roi)).eval()
    meta = {"modalities": ["t1", "t1ce", "t2", "flair"], "roi": list(roi)}
    image = torch.randn(4, roi[0] + roi[0] // 2, *roi[1:])  # two windows along D at overlap 0.5
    subsets = [[i for i in range(4) if c >> i & 1] for c in range(1, 16)]
    t_one = median_time(lambda: I.predict_subsets(net, image, subsets, meta), repeats=1, warmup=0)
    t_sep = median_time(lambda: [I.predict(net, image, s, meta) for s in subsets], repeats=1, warmup=0)
    diff = max((a - I.predict(net, image, s, meta)).abs().max().item()
               for a, s in zip(I.predict_subsets(net, image, subsets, meta), subsets[:3]))
    print_table(f"15-subset whole-volume inference, F={fs}, volume {tuple(image.shape[1:])}, roi {roi}",
                [{"one pass s": t_one, "15 passes s": t_sep, "speedup": t_sep / t_one, "max |diff|": diff}],
                ["one pass s", "15 passes s", "speedup", "max |diff|"])


# predict benchmark: predict.py on one BraTS-sized case against MONAI's sliding_window_inference
BRATS_GRID = (240, 240, 155)


def _brats_sized_case(folder):
    """One demo person at 1 mm (the MNI152 anatomy of demo_data) on a 240 x 240 x 155 grid, as
    BraTS ships its cases: the T1 file's path."""
    import nibabel as nib
    import numpy as np

    import demo_data

    demo_data.build(folder / "demo", n_persons=1, seed=0, spacing=1.0, verbose=False)
    src = folder / "demo" / "brats" / "demo_000" / "demo_000_t1.nii.gz"
    img = nib.load(str(src))
    a = np.asarray(img.dataobj, dtype=np.float32)
    start = []
    for axis, n in enumerate(BRATS_GRID):  # centre the grid on the brain, pad or crop
        hit = np.flatnonzero(a.any(axis=tuple(k for k in range(3) if k != axis)))
        start.append(int((hit[0] + hit[-1] + 1) // 2 - n // 2))
    out = np.zeros(BRATS_GRID, np.float32)
    src_sl, dst_sl = [], []
    for s, n, m in zip(start, BRATS_GRID, a.shape):
        lo, hi = max(s, 0), min(s + n, m)
        src_sl.append(slice(lo, hi))
        dst_sl.append(slice(lo - s, hi - s))
    out[tuple(dst_sl)] = a[tuple(src_sl)]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array(start, float) + img.affine[:3, 3]
    path = folder / "case_t1.nii.gz"
    nib.save(nib.Nifti1Image(out, affine), str(path))
    return path


def _predict_nets(fs, seed=0):
    """A transfer (4 -> 4 channels) and a segmentation (4 -> 3) MONAI SwinUNETR, the same seeds
    every call, so that both sides run the same weights."""
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    torch.manual_seed(seed)
    return [MonaiSwinUNETR(in_channels=4, out_channels=k, feature_size=fs).eval() for k in (4, 3)]


def _predict_child(conn, which, t1, out, fs, roi, overlap, sw_batch_size):
    """One side in a fresh process: (seconds, peak MiB added by the prediction).
    Both sides read the T1 file and write the other three modalities and a label map."""
    import nibabel as nib
    import numpy as np

    nets = _predict_nets(fs)
    if which == "ours":
        import model
        import predict as P
        from metrics import LABELS

        mods = ["t1", "t1ce", "t2", "flair"]
        ours = []
        for k, peer in zip((4, 3), nets):
            net = model.SwinUNETR(4, k, feature_size=fs, attn_backend="sdpa").eval()
            net.load_state_dict(peer.state_dict())
            ours.append(net)
        nets = None
        base = {"modalities": mods, "inputs": mods, "roi": list(roi), "contract": {"spacing": [1.0] * 3},
                "step": 0, "commit": "bench", "label_kind": "brats"}
        networks = [P.Network("transfer", Path("bench"), ours[0], {**base, "task": "transfer", "targets": mods}),
                    P.Network("seg", Path("bench"), ours[1], {**base, "task": "seg", "targets": [],
                                                               "regions": ["tc", "wt", "et"]},
                              dict(LABELS["brats"][1]))]
        cfg = P.parse_args(["--seg-ckpt", "bench", "--input", f"t1={t1}", "--out", str(out), "--device", "cpu",
                            "--overlap", str(overlap), "--sw-batch-size", str(sw_batch_size), "--quiet"])
        case = P.case_from_inputs(cfg.input, mods)
    base_rss = reset_peak()
    t0 = time.perf_counter()
    if which == "ours":
        P.predict_case(case, networks, cfg, Path(out))
    else:
        from monai.inferers import sliding_window_inference
        from monai.transforms import NormalizeIntensity

        img = nib.load(str(t1))
        x = NormalizeIntensity(nonzero=True)(torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32)))
        x = x[None, None].repeat(1, 4, 1, 1, 1)
        with torch.no_grad():
            y, s = (sliding_window_inference(x, roi, sw_batch_size, net, overlap, mode="gaussian")[0] for net in nets)
        for k, m in enumerate(("t1ce", "t2", "flair"), 1):
            nib.save(nib.Nifti1Image(y[k].numpy(), img.affine), str(Path(out) / f"{m}.nii.gz"))
        tc, wt, et = (s > 0).numpy()
        label = np.where(wt, 2, 0).astype(np.uint8)
        label[tc], label[et] = 1, 4
        nib.save(nib.Nifti1Image(label, img.affine), str(Path(out) / "seg.nii.gz"))
    conn.send((time.perf_counter() - t0, peak_since(base_rss)))


def bench_predict(args):
    """predict.py on one BraTS-sized case (240 x 240 x 155, 1 mm), T1 -> T1ce, T2, FLAIR and a
    segmentation, against MONAI's sliding_window_inference on MONAI's SwinUNETR with the same
    weights, roi, overlap, window batch and Gaussian blending (the plain network, the part both
    can do). Each side runs once in a fresh process; time and peak memory include reading the
    input and writing the outputs."""
    import tempfile

    import numpy as np

    import data
    import layouts
    from inference import _window_starts

    fs, roi = (12, (64, 64, 64)) if args.quick else (48, (96, 96, 96))
    overlap, sw = 0.5, 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t1 = _brats_sized_case(tmp)
        res = {}
        for which in ("ours", "monai"):
            out = tmp / which
            out.mkdir()
            res[which] = in_fresh_process(_predict_child, which, t1, out, fs, roi, overlap, sw)
        case = layouts.Case("case", {"t1": t1})
        vol = data.load_case(case, layouts.DatasetSpec(tmp, "x", ["t1"], [case], None), use_cache=False)
        crop = vol.record["shape_out"]
    count = lambda shape: int(np.prod([len(_window_starts(n, r, overlap)) for n, r in zip(shape, roi)]))
    rows = [{"side": w, "grid": "x".join(map(str, g)), "windows": 2 * count(g), "s": res[w][0], "peak MiB": res[w][1]}
            for w, g in (("ours", crop), ("monai", BRATS_GRID))]
    rows.append({"side": "ours / monai", "grid": "", "windows": rows[0]["windows"] / rows[1]["windows"],
                 "s": rows[0]["s"] / rows[1]["s"], "peak MiB": rows[0]["peak MiB"] / rows[1]["peak MiB"]})
    print_table(f"predict: T1 -> T1ce, T2, FLAIR + segmentation, {'x'.join(map(str, BRATS_GRID))} at 1 mm, "
                f"SwinUNETR F={fs}, roi {roi}, overlap {overlap}, sw_batch_size {sw}, CPU (ours: the brain crop "
                "of predict.py)", rows, ["side", "grid", "windows", "s", "peak MiB"])


# ---- end of benchmarks ----


def main(argv=None):
    names = sorted(k[len("bench_"):] for k in globals() if k.startswith("bench_"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=names)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes")
    ap.add_argument("--static", action="store_true",
                    help="kernels: registers, spills and shared memory of every kernel compiled for sm_80 / sm_90 "
                         "(no GPU needed)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--mfu", type=float, default=0.3, help="flops: the fraction of the GPU's peak a step reaches")
    ap.add_argument("--against", default="", metavar="REV",
                    help="steps: also time the step of this commit (a temporary git worktree), in the same run")
    ap.add_argument("--write", default="", metavar="FILE",
                    help="replace the section bench-NAME of this Markdown file with the output (docs/benchmarks.md)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from files import git_commit

    commit, printed = git_commit(), io.StringIO()  # the code that runs, read before it runs
    with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
        print(f"torch {torch.__version__}, device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, threads {torch.get_num_threads()}")
        globals()["bench_" + args.what](args)
    if args.write:
        write_section(args, printed.getvalue(), commit)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def write_section(args, printed, commit):
    """What one benchmark printed, as the section bench-NAME of args.write, headed by the command
    that made it, the date and the commit."""
    from files import replace_section

    flags = "".join(f" --{f}" for f in ("quick", "static") if getattr(args, f)) + \
        (f" --threads {args.threads}" if args.threads else "") + (f" --against {args.against}" if args.against else "")
    name = f"bench-{args.what}" + ("-static" if args.static else "")
    lines = [f"Made by `python bench.py {args.what}{flags}` on {time.strftime('%Y-%m-%d')}, commit {commit}:", ""]
    for line in printed.strip().splitlines():
        if lines[-1] and line and lines[-1].startswith("|") != line.startswith("|"):
            lines.append("")  # a table is a block of its own
        lines.append("#" + line if line.startswith("#") else line)  # its headings one level below the page's
    replace_section(args.write, name, "\n".join(lines) + "\n")
    print(f"{args.write}: section {name} replaced", file=sys.stderr)


if __name__ == "__main__":
    main()
