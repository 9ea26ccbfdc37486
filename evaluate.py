"""Evaluation: whole-volume sliding-window inference, the paper's metrics (METHOD.md, "Evaluation
protocols"), its tables as Markdown/CSV/JSON, and figures.

Every metric takes torch tensors or numpy arrays and runs where the tensors live (CPU or GPU);
nothing here imports scipy, scikit-image or MONAI (the tests compare against them).

    inference  sliding_window_inference (Gaussian blending, any volume size, CPU stitching)
    transfer   psnr, nmse, ssim3d, transfer_metrics(protocol="reference" | "strict" | "brasyn"),
               transfer_case (all targets of one case)
    BraTS      brats_regions (2018-21 and 2023 labels), dice, hd95, brats_seg_metrics, seg_case,
               brats_summary
    AutoPET    connected_components (18-connectivity), autopet_case_metrics, autopet_summary,
               confusion_rates
    empty masks: EMPTY_POLICIES presets "brats", "monai", "autopet"; summaries name the policy
               and count the empty cases, because tools disagree on them
    tables     transfer_matrix_table (Table 10), transfer_summary_table (Table 9),
               missing_modality_table (Table 11), autopet_table (Table 8), write_table
    figures    figure_transfer (Figures 8, 10-12), figure_segmentation, figure_embedding (PCA,
               Figure 9)
    command    main(argv): a tuned checkpoint on held-out persons -> tables, results.json, NIfTI
               predictions on the input's grid, figures (python evaluate.py --help)

Volumes are (D, H, W) = (x, y, z) in RAS order as data.py produces them: axial slices are
fixed z, coronal fixed y, sagittal fixed x.
"""
import argparse
import csv
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

HERE = Path(__file__).resolve().parent


def _tensor(x, name="input"):
    """numpy array or tensor -> tensor on its own device (numpy arrays are shared when torch
    can hold their dtype and byte order, as nibabel's big-endian or uint16 arrays it cannot)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        if x.dtype in (np.uint16, np.uint32, np.uint64):
            x = x.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")


def _pair(pred, gt, what):
    p, g = _tensor(pred, f"{what} pred"), _tensor(gt, f"{what} gt")
    if p.shape != g.shape:
        raise ValueError(f"{what}: pred shape {tuple(p.shape)} != gt shape {tuple(g.shape)}")
    return p, g.to(p.device)


def _mask(x, name):
    """Boolean mask from a bool tensor/array or one holding only 0 and 1."""
    m = _tensor(x, name)
    if m.dtype == torch.bool:
        return m
    if m.is_complex():
        raise TypeError(f"{name}: unsupported mask dtype {m.dtype}")
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError(f"{name}: a mask must hold only 0 and 1 (threshold probabilities first)")
    return m != 0


@contextmanager
def _one_thread():
    """Runs loops of many small CPU ops without the intra-op thread pool: such ops gain nothing
    from it, and on a busy machine each parallel region can wait a scheduler slice for its
    other threads (50x slower HD95 measured on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Image similarity: PSNR, NMSE, 3-D SSIM


def psnr(pred, gt, data_range):
    """Peak signal-to-noise ratio 10 log10(R^2 / MSE) in dB, computed in float64."""
    if not data_range > 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    p, g = _pair(pred, gt, "psnr")
    mse = torch.mean((p.double() - g.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(float(data_range) ** 2 / mse)


def nmse(pred, gt):
    """Normalised mean squared error ||pred - gt||^2 / ||gt||^2, computed in float64."""
    p, g = _pair(pred, gt, "nmse")
    g = g.double()
    den = torch.sum(g * g).item()
    if den == 0:
        raise ValueError("nmse: the ground truth is all zero, so NMSE is undefined")
    return torch.sum((p.double() - g) ** 2).item() / den


def _box_sum(x, w, step, out):
    """out[:, i] = sum_k<w x[:, i + k * step] for i < L - (w - 1) * step, where x is (C, L) with
    unit column stride: one reduction over an overlapping (C, w, m) view of x (1.6x faster on
    CPU than partial sums of 1, 2, 4 terms). The tail of out is left as it was. Returns the
    written part of out."""
    m = x.shape[1] - (w - 1) * step
    windows = x.as_strided((x.shape[0], w, m), (x.stride(0), step, 1))
    return torch.sum(windows, 1, out=out[:, :m])


_SSIM_REFRESH = 32  # CPU: the running depth sum is recomputed from its w slices this often
_SSIM_STREAM_CPU = True  # False runs the GPU's whole-slab path on CPU (tests compare the two)


def _ssim_products(xs, ys, prod, xy, k):
    """prod (4, n) <- s, d, s^2 + c2/N, d^2 of flat xs, ys (n,), where s = (x + y) / R - ks and
    d = (x - y) / R - kd are centred on their global means; xy: scratch (2, n); k: constants.
    Each step handles both rows in one op: s, d = X + Y, X - Y with X = x / R - (ks + kd) / 2
    and Y = y / R - (ks - kd) / 2."""
    torch.add(k["x"], xs, alpha=k["inv"], out=xy[0])
    torch.add(k["y"], ys, alpha=k["inv"], out=xy[1])
    torch.addcmul(xy[:1], xy[1:], k["plus_minus"], out=prod[:2])
    torch.addcmul(k["c2n"], prod[:2], prod[:2], out=prod[2:])  # c2 / N per voxel: Sss gains c2


def _ssim_add_map(total, sums, weight, tmp, k):
    """total += SSIM map (times weight) from the window sums (4, n) of s, d, s^2 + c2/N, d^2.
    With s = x + y and d = x - y (in units of R): 2 ux uy = (Ss^2 - Sd^2) / 2N^2, ux^2 + uy^2 =
    (Ss^2 + Sd^2) / 2N^2, 2 sxy = (Vs - Vd) / 2 and sx^2 + sy^2 = (Vs + Vd) / 2, where V are
    the sample variances; both factors of the ratio are scaled alike, so the constants are too.
    tmp: scratch (6, n); pairs of rows go through one op."""
    N = k["N"]
    t = torch.add(sums[:2], k["s_d"], alpha=N, out=tmp[:2])  # uncentred Ss, Sd
    v = torch.addcmul(sums[2:], sums[:2], sums[:2], value=-1.0 / N, out=tmp[2:4])  # (Vs + c2, Vd) / N
    q = torch.addcmul(k["c1"], t[0], t[0], out=tmp[4])  # Ss^2 + c1
    torch.mul(t[1], t[1], out=tmp[5])  # Sd^2
    ab = torch.addcmul(q, tmp[5], k["minus_plus"], out=tmp[:2])  # Ss^2 + c1 -/+ Sd^2
    ab.mul_(torch.addcmul(v[0], v[1], k["minus_plus"], out=tmp[4:]))  # times Vs + c2 -/+ Vd
    if weight is None:
        total.addcdiv_(ab[0], ab[1])
    else:
        total.add_(ab[0].div_(ab[1]).mul_(weight))


def _ssim_slab(x, y, weight, w, dtype, inv, ks, kd, stream=True):
    """Sum of the SSIM map over the valid region of a slab (D, H, W) of both volumes, weighted
    by `weight` (the mask over the valid region, or None).

    stream=True (CPU) goes slice by slice, so each op works on one slice (about 1 MiB for 4
    rows of 240x240) that is still in cache from the op before, instead of on the volume: per
    input slice the products, the box sums along w and h into a ring of w slices, and the
    depth window sum kept as a running sum (minus the slice that leaves, plus
    the one that enters; recomputed from the ring every _SSIM_REFRESH slices to bound the
    rounding drift), then the map of one output slice. stream=False (GPU) does each step once
    over the whole slab. Positions whose windows wrap across a row or slice of the flat arrays
    fall in the cropped border."""
    D, H, W = x.shape
    P, r, N = H * W, w - 1, w ** 3
    dev = x.device
    const = lambda v: torch.tensor(v, dtype=dtype, device=dev)
    k = {"inv": inv, "N": N, "x": const(-(ks + kd) / 2), "y": const(-(ks - kd) / 2),
         "s_d": const([[ks], [kd]]), "plus_minus": const([[1.0], [-1.0]]), "minus_plus": const([[-1.0], [1.0]]),
         "c1": const(2.0 * (0.01 ** 2) * N * N),  # A1, B1 scaled by 2 N^2 (in units of R)
         "c2n": const([[2.0 * (0.03 ** 2) * (N - 1) / N], [0.0]])}  # A2, B2 scaled by 2 N / cn, cn = N / (N - 1)
    if weight is not None:  # laid out like the flat output slices, zero in the cropped border
        wflat = torch.zeros(D - r, H, W, dtype=dtype, device=dev)
        wflat[:, :H - r, :W - r] = weight
        weight = wflat.reshape(D - r, P)
    xf, yf = x.reshape(D, P), y.reshape(D, P)
    zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=dev)
    if not stream:
        prod, wsum, hsum = zeros(4, D * P), zeros(4, D * P), zeros(4, D * P)
        _ssim_products(xf.reshape(-1).to(dtype), yf.reshape(-1).to(dtype), prod, hsum[:2], k)  # hsum as scratch
        _box_sum(prod, w, 1, wsum)  # along w
        _box_sum(wsum, w, W, hsum)  # along h
        sums = _box_sum(hsum, w, P, prod)  # along d
        total = zeros((D - r) * P)
        _ssim_add_map(total, sums, None if weight is None else weight.reshape(-1), zeros(6, (D - r) * P), k)
    else:
        prod, u, tmp, total = zeros(4, P), zeros(4, P), zeros(6, P), zeros(P)
        wsum = tmp[:4]  # tmp is free until the map: fewer arrays per slice, fewer cache misses
        ring = zeros(w, 4, P)  # the last w slices filtered along w and h; slice z in ring[z % w]
        for z in range(D):
            _ssim_products(xf[z].to(dtype), yf[z].to(dtype), prod, tmp[4:], k)
            _box_sum(prod, w, 1, wsum)
            slot, fresh = ring[z % w], (z - r) % _SSIM_REFRESH == 0
            if z > r and not fresh:
                u.sub_(slot)  # slice z - w leaves the window
            _box_sum(wsum, w, W, slot)
            if z < r:
                continue
            if fresh:
                torch.sum(ring, 0, out=u)
            else:
                u.add_(slot)
            _ssim_add_map(total, u, None if weight is None else weight[z - r], tmp, k)
    # total: the map summed per position, over one plane (stream) or per output slice
    return rearrange(total, "(c h w) -> c h w", h=H, w=W)[:, :H - r, :W - r].sum(dtype=torch.float64).item()


def ssim3d(pred, gt, data_range, win_size=7, mask=None, dtype=torch.float32):
    """Mean 3-D SSIM with scikit-image's `structural_similarity` defaults: uniform win_size^3
    window, sample covariance, K1 = 0.01, K2 = 0.03, averaged over the voxels at least
    (win_size - 1) // 2 from the border (or over the mask voxels among them).

    Box sums are separable and run over flat arrays: a shift by 1, W or H*W along the flattened
    volume sums along w, h or d, and the sums that wrap across a row or slice fall in the
    cropped border. On CPU the depth is split in one slab per torch thread, each streamed slice
    by slice (see _ssim_slab) and each run by single-threaded ops (a busy machine stalls the
    thread pool's per-op barriers, measured 20x slower).
    Accuracy: the images are scaled by 1/data_range and the box sums run on x + y and x - y
    minus their global means, so float32 sums stay small; the mean offset is added back
    exactly. Relative to float64 the mean moves by ~1e-9 on typical volumes and below 1e-5 on
    the tests' worst cases; dtype=torch.float64 is the exact path (about 2x slower on CPU)."""
    p, g = _pair(pred, gt, "ssim3d")
    if p.ndim != 3:
        raise ValueError(f"ssim3d: expected (D, H, W) volumes, got shape {tuple(p.shape)}")
    w = int(win_size)
    if w < 3 or w % 2 == 0:
        raise ValueError(f"ssim3d: win_size must be odd and >= 3, got {win_size}")
    if min(p.shape) < w:
        raise ValueError(f"ssim3d: every side must be >= win_size {w}, got shape {tuple(p.shape)}")
    if not data_range > 0:
        raise ValueError(f"ssim3d: data_range must be > 0, got {data_range}")
    D, H, W = p.shape
    r = w - 1
    half = r // 2
    valid = None
    if mask is not None:
        m = _mask(mask, "ssim3d mask").to(p.device)
        if m.shape != p.shape:
            raise ValueError(f"ssim3d: mask shape {tuple(m.shape)} != volume shape {tuple(p.shape)}")
        valid = m[half:D - half, half:H - half, half:W - half]
        if not bool(valid.any()):
            raise ValueError(f"ssim3d: the mask has no voxel at least {half} voxels from the border")
    inv = 1.0 / float(data_range)
    mx, my = p.mean(dtype=dtype).item(), g.mean(dtype=dtype).item()
    ks, kd = (mx + my) * inv, (mx - my) * inv  # means of s = (x + y) / R and d = (x - y) / R
    count = valid.sum().item() if valid is not None else (D - r) * (H - r) * (W - r)
    if p.is_cuda or not _SSIM_STREAM_CPU:
        return _ssim_slab(p, g, valid, w, dtype, inv, ks, kd, stream=False) / count
    # output slices [o0, o1) of a slab need input slices [o0, o1 + r)
    parts = max(1, min(torch.get_num_threads(), (D - r) // 16))
    cuts = [round(i * (D - r) / parts) for i in range(parts + 1)]
    jobs = [(p[a:b + r], g[a:b + r], None if valid is None else valid[a:b]) for a, b in zip(cuts, cuts[1:])]
    run = lambda job: _ssim_slab(*job, w, dtype, inv, ks, kd)
    with _one_thread():
        if parts == 1:
            return run(jobs[0]) / count
        with ThreadPoolExecutor(parts) as pool:
            return sum(pool.map(run, jobs)) / count


# ---------------------------------------------------------------------------------------------
# Transfer protocols


def _ptp(x):
    return (x.max() - x.min()).item()


def _percentile(x, q):
    """np.percentile(x, q) with linear interpolation (torch.quantile caps the input size)."""
    flat = x.reshape(-1)
    pos = q / 100.0 * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    vlo = flat.kthvalue(lo + 1).values.double()
    vhi = vlo if hi == lo else flat.kthvalue(hi + 1).values.double()
    return (vlo + (vhi - vlo) * (pos - lo)).item()


def _clip_scale(x, what, p_lo=0.5, p_hi=99.5):
    lo, hi = _percentile(x, p_lo), _percentile(x, p_hi)
    if not hi > lo:
        raise ValueError(f"transfer_metrics: {what} has equal {p_lo} and {p_hi} percentiles ({lo}); "
                         "cannot scale it to [0, 1]")
    return (x.double().clamp(lo, hi) - lo) / (hi - lo)


def transfer_metrics(pred, gt, fg, protocol="reference", tumour=None, ssim_dtype=torch.float32):
    """PSNR, NMSE and 3-D SSIM of one generated modality (D, H, W) against its ground truth.

    reference  the paper's numbers: the prediction is z-scored over the foreground (the voxels
               the data layer normalised the truth over), background voxels are replaced by the
               truth, data_range = max(ptp(pred), ptp(gt)); metrics over the whole volume.
    strict     the raw prediction, no pasting; PSNR and NMSE over foreground voxels, SSIM map
               averaged over foreground voxels, data_range from the foreground.
    brasyn     BraSyn challenge style: each image clipped to its own 0.5-99.5 percentiles over
               the whole volume and scaled to [0, 1]; PSNR (range 1), NMSE and SSIM over the
               volume, plus SSIM inside the tumour (both images multiplied by the tumour mask,
               map averaged over it) and outside. Differences from the BraSyn script, which
               reads raw MR intensities: it also raises a negative lower percentile to 0 (that
               would erase half of a z-scored volume, so it is not done here) and uses
               torchmetrics' Gaussian window, where every protocol here shares the 7^3 window.
    Returns a dict with the metrics, the protocol and the data range used."""
    p, g = _pair(pred, gt, "transfer_metrics")
    if p.ndim != 3:
        raise ValueError(f"transfer_metrics: expected (D, H, W) volumes, got shape {tuple(p.shape)}")
    out = {"protocol": protocol}
    if protocol in ("reference", "strict"):
        if fg is None:
            raise ValueError(f"transfer_metrics: protocol {protocol!r} needs the foreground mask fg")
        m = _mask(fg, "transfer_metrics fg").to(p.device)
        if m.shape != p.shape:
            raise ValueError(f"transfer_metrics: fg shape {tuple(m.shape)} != volume shape {tuple(p.shape)}")
        if not bool(m.any()):
            raise ValueError("transfer_metrics: the foreground mask is empty")
        p, g = p.double(), g.double()
        if protocol == "reference":
            v = p[m]
            std = v.std(unbiased=False).item()
            if std == 0:
                raise ValueError("transfer_metrics: the prediction is constant over the foreground; "
                                 "cannot z-score it")
            p = torch.where(m, (p - v.mean()) / std, g)
            rng = max(_ptp(p), _ptp(g))
            out.update(psnr=psnr(p, g, rng), nmse=nmse(p, g), ssim=ssim3d(p, g, rng, dtype=ssim_dtype))
        else:
            pv, gv = p[m], g[m]
            rng = max(_ptp(pv), _ptp(gv))
            if rng == 0:
                raise ValueError("transfer_metrics: prediction and truth are constant over the foreground")
            out.update(psnr=psnr(pv, gv, rng), nmse=nmse(pv, gv), ssim=ssim3d(p, g, rng, mask=m, dtype=ssim_dtype))
        out["data_range"] = rng
    elif protocol == "brasyn":
        p, g = _clip_scale(p, "the prediction"), _clip_scale(g, "the ground truth")
        out.update(psnr=psnr(p, g, 1.0), nmse=nmse(p, g), ssim=ssim3d(p, g, 1.0, dtype=ssim_dtype), data_range=1.0)
        out["ssim_tumour"] = out["ssim_non_tumour"] = math.nan
        if tumour is not None:
            t = _tensor(tumour, "transfer_metrics tumour").to(p.device) != 0
            if t.shape != p.shape:
                raise ValueError(f"transfer_metrics: tumour shape {tuple(t.shape)} != volume shape {tuple(p.shape)}")
            if bool(t.any()):
                out["ssim_tumour"] = ssim3d(p * t, g * t, 1.0, mask=t, dtype=ssim_dtype)
            if not bool(t.all()):
                out["ssim_non_tumour"] = ssim3d(p * ~t, g * ~t, 1.0, mask=~t, dtype=ssim_dtype)
    else:
        raise ValueError(f"transfer_metrics: protocol must be 'reference', 'strict' or 'brasyn', got {protocol!r}")
    return out


def transfer_case(case, source, preds, truths, fg, names, protocol="reference", tumour=None, **kw):
    """transfer_metrics for every generated target of one case and source: preds and truths are
    (T, D, H, W) (or lists), names the T target modalities. Returns one dict per target with
    case, source, target and the metrics, the rows transfer_*_table expect."""
    if not (len(preds) == len(truths) == len(names)):
        raise ValueError(f"transfer_case {case}: {len(preds)} predictions, {len(truths)} truths, {len(names)} names")
    return [{"case": case, "source": source, "target": t, **transfer_metrics(p, g, fg, protocol, tumour, **kw)}
            for p, g, t in zip(preds, truths, names)]


# ---------------------------------------------------------------------------------------------
# Overlap and distance metrics, with a named policy for empty masks

# Keys: Dice and HD95 when both masks are empty, when only the truth is empty (the prediction
# is not) and when only the prediction is empty. NaN values are left out of means.
EMPTY_POLICIES = {
    # mmFormer / BraTS challenge: 373.13 mm is the diagonal of the 240 x 240 x 155 1-mm grid
    "brats": dict(dice_both_empty=1.0, dice_gt_empty=0.0, dice_pred_empty=0.0,
                  hd_both_empty=0.0, hd_gt_empty=373.13, hd_pred_empty=373.13),
    # MONAI: DiceMetric(ignore_empty=True); compute_hausdorff_distance(percentile=95) gives NaN
    # as soon as a mask is empty (the percentile of infinite distances)
    "monai": dict(dice_both_empty=math.nan, dice_gt_empty=math.nan, dice_pred_empty=0.0,
                  hd_both_empty=math.nan, hd_gt_empty=math.nan, hd_pred_empty=math.nan),
    # AutoPET: a true negative has no Dice, a false positive on a negative case scores 0;
    # the challenge defines no surface distance, so empty masks give NaN
    "autopet": dict(dice_both_empty=math.nan, dice_gt_empty=0.0, dice_pred_empty=0.0,
                    hd_both_empty=math.nan, hd_gt_empty=math.nan, hd_pred_empty=math.nan),
}


def _policy(empty):
    """(name, values) of an empty-mask policy given by preset name or as a dict."""
    if isinstance(empty, str):
        if empty not in EMPTY_POLICIES:
            raise ValueError(f"unknown empty-mask policy {empty!r}; presets: {sorted(EMPTY_POLICIES)}")
        return empty, EMPTY_POLICIES[empty]
    if isinstance(empty, dict):
        missing = set(EMPTY_POLICIES["brats"]) - set(empty)
        if missing:
            raise ValueError(f"empty-mask policy dict lacks {sorted(missing)}")
        return str(empty.get("name", "custom")), empty
    raise TypeError(f"empty policy must be a preset name or a dict, got {type(empty).__name__}")


def _empty_case(p_any, g_any, pol, kind):
    if not p_any and not g_any:
        return pol[f"{kind}_both_empty"]
    if not g_any:
        return pol[f"{kind}_gt_empty"]
    return pol[f"{kind}_pred_empty"]


def dice(pred, gt, empty="brats"):
    """Dice 2|P&G| / (|P| + |G|) of two binary masks; empty masks follow the policy."""
    p, g = _mask(pred, "dice pred"), _mask(gt, "dice gt").to(_tensor(pred).device)
    if p.shape != g.shape:
        raise ValueError(f"dice: pred shape {tuple(p.shape)} != gt shape {tuple(g.shape)}")
    _, pol = _policy(empty)
    n_p, n_g = p.sum().item(), g.sum().item()
    if n_p == 0 or n_g == 0:
        return _empty_case(n_p > 0, n_g > 0, pol, "dice")
    return 2.0 * (p & g).sum().item() / (n_p + n_g)


def confusion_rates(pred, gt):
    """tp, fp, tn, fn and TPR = tp/p, TNR = tn/n, FPR = fp/n, FNR = fn/p (NaN when the
    denominator is 0, as MONAI). Works on voxel masks or on per-case 0/1 vectors."""
    p, g = _mask(pred, "confusion pred"), _mask(gt, "confusion gt").to(_tensor(pred).device)
    if p.shape != g.shape:
        raise ValueError(f"confusion_rates: pred shape {tuple(p.shape)} != gt shape {tuple(g.shape)}")
    tp, fp = (p & g).sum().item(), (p & ~g).sum().item()
    tn, fn = (~p & ~g).sum().item(), (~p & g).sum().item()
    pos, neg = tp + fn, tn + fp

    def ratio(a, b):
        return a / b if b > 0 else math.nan
    return dict(tp=tp, fp=fp, tn=tn, fn=fn, tpr=ratio(tp, pos), tnr=ratio(tn, neg),
                fpr=ratio(fp, neg), fnr=ratio(fn, pos))


def _spacing(spacing, where):
    s = (1.0,) * 3 if spacing is None else tuple(np.broadcast_to(np.asarray(spacing, dtype=float), (3,)).tolist())
    if not all(v > 0 for v in s):
        raise ValueError(f"{where}: spacing must be positive, got {spacing}")
    return s


def _edges(m):
    """Surface voxels: mask voxels with a 6-neighbour outside the mask (outside the array too)."""
    D, H, W = m.shape
    x = torch.zeros((D + 2, H + 2, W + 2), dtype=torch.bool, device=m.device)
    x[1:-1, 1:-1, 1:-1] = m
    inner = m.clone()
    for a, b, c in ((0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)):
        inner &= x[a:a + D, b:b + H, c:c + W]
    return m & ~inner


def _morton(c):
    """Z-order key of integer coordinates (n, 3) < 2^10: sorting by it keeps neighbours together."""
    key = torch.zeros(c.shape[0], dtype=torch.int64, device=c.device)
    for bit in range(10):
        for axis in range(3):
            key |= ((c[:, axis] >> bit) & 1) << (3 * bit + 2 - axis)
    return key


def _within_reach(pts, b):
    """The points of b that can be nearest to some point of pts: for a point c of pts, every
    point p of pts has a neighbour in b within d(c, b) + |p - c|, so points of b farther than
    that from the bounding box of pts are never nearest."""
    lo, hi = pts.min(0).values, pts.max(0).values
    c = pts[pts.shape[0] // 2]
    reach = (b - c).norm(dim=1).min() + (pts - c).norm(dim=1).max()
    gap = ((lo - b).clamp(min=0) ** 2 + (b - hi).clamp(min=0) ** 2).sum(1)
    return b[gap <= reach * reach * (1 + 1e-12) + 1e-9]


def _cells(pts, side):
    """Indices of pts grouped by cubic cells of `side` mm, cells in Z-order."""
    key = _morton(((pts - pts.min(0).values) / side).long())
    order = torch.argsort(key)
    counts = torch.unique_consecutive(key[order], return_counts=True)[1]
    return torch.split(order, counts.tolist())


def _nearest(a, b):
    """Distance from each point of a (n, 3) to its nearest point of b (m, 3), in mm, exact up to
    float64 rounding.
    Points of a are grouped in cells of 48 mm, large groups again in cells of 12 mm; each group
    is compared only with the points of b within reach of it (_within_reach)."""
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    for coarse in _cells(a, 48.0):
        near = _within_reach(a[coarse], b)
        for fine in (_cells(a[coarse], 12.0) if coarse.numel() > 256 else [slice(None)]):
            idx = coarse[fine]
            pts = a[idx]
            cand = _within_reach(pts, near)
            # pick the nearest with the fast |p|^2 + |q|^2 - 2pq form, then measure that pair exactly
            nearest = cand[torch.cdist(pts - pts[0], cand - pts[0]).argmin(1)]
            out[idx] = (pts - nearest).norm(dim=1)
    return out


def _quantile(v, q):
    """torch.quantile(v, q) with linear interpolation, without its input-size limit."""
    s = torch.sort(v).values
    pos = q * (s.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return (s[lo] + (s[hi] - s[lo]) * (pos - lo)).item()


@_one_thread()
def hd95(pred, gt, spacing=None, empty="brats", percentile=95.0):
    """Symmetric percentile Hausdorff distance in mm, MONAI's convention: surface voxels are mask
    voxels with a 6-neighbour outside; the result is the larger of the two directed
    `percentile`-th percentiles of exact Euclidean surface-to-surface distances."""
    p, g = _mask(pred, "hd95 pred"), _mask(gt, "hd95 gt").to(_tensor(pred).device)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"hd95: expected two (D, H, W) masks of one shape, "
                         f"got {tuple(p.shape)} and {tuple(g.shape)}")
    s = _spacing(spacing, "hd95")
    _, pol = _policy(empty)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any or not g_any:
        return _empty_case(p_any, g_any, pol, "hd")
    # both surfaces lie in the bounding box of the union, so the distances can be computed there
    nz = torch.nonzero(p | g)
    lo, hi = nz.min(0).values.tolist(), (nz.max(0).values + 1).tolist()
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    scale = torch.tensor(s, dtype=torch.float64, device=p.device)
    ep = torch.nonzero(_edges(p[box])).double() * scale
    eg = torch.nonzero(_edges(g[box])).double() * scale
    d_pg, d_gp = _nearest(ep, eg), _nearest(eg, ep)
    return max(_quantile(d_pg, percentile / 100.0), _quantile(d_gp, percentile / 100.0))


# ---------------------------------------------------------------------------------------------
# BraTS regions

BRATS_CONVENTIONS = {  # region -> label values; "brats": 2018-2021 (ET = 4), "brats2023": ET = 3
    "brats": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
}
REGIONS = ("WT", "TC", "ET")


def brats_regions(label, convention="brats"):
    """Label map (D, H, W) -> {"WT", "TC", "ET"} boolean masks. convention "brats" (labels
    0, 1, 2, 4), "brats2023" (0, 1, 2, 3) or "auto" (decided by whether 3 or 4 occurs).
    Any other label value is an error, so a wrong convention cannot silently zero ET."""
    lab = _tensor(label, "brats_regions label")
    values = set(torch.unique(lab).tolist())
    if convention == "auto":
        if {3, 4} <= values:
            raise ValueError("brats_regions: labels 3 and 4 both occur; cannot tell the BraTS convention")
        convention = "brats2023" if 3 in values else "brats"
    if convention not in BRATS_CONVENTIONS:
        raise ValueError(f"brats_regions: convention must be 'brats', 'brats2023' or 'auto', got {convention!r}")
    allowed = {0, 1, 2, 4} if convention == "brats" else {0, 1, 2, 3}
    if not values <= allowed:
        raise ValueError(f"brats_regions: label values {sorted(values - allowed)} are not in the {convention} "
                         f"convention {sorted(allowed)}")
    return {k: torch.isin(lab, torch.tensor(v, dtype=lab.dtype, device=lab.device))
            for k, v in BRATS_CONVENTIONS[convention].items()}


def _regions(x, name):
    """{"WT", "TC", "ET"} masks from a dict (any key case) or a (3, D, H, W) array in REGIONS order."""
    if isinstance(x, dict):
        d = {str(k).upper(): v for k, v in x.items()}
        if set(d) != set(REGIONS):
            raise ValueError(f"brats_seg_metrics: {name} must have the regions {REGIONS}, got {sorted(d)}")
        return d
    t = _tensor(x, name)
    if t.ndim != 4 or t.shape[0] != 3:
        raise ValueError(f"brats_seg_metrics: {name} must be a dict or a (3, D, H, W) array in {REGIONS} order, "
                         f"got shape {tuple(t.shape)}")
    return dict(zip(REGIONS, t))


def brats_seg_metrics(pred_regions, gt_regions, policy="brats", spacing=None, hd=False):
    """Dice (and HD95 when hd=True) per BraTS region for one case. Regions come as dicts from
    brats_regions or as (3, D, H, W) arrays in WT, TC, ET order (model outputs in data.py's
    tc, wt, et channel order: pass dict(zip(("TC", "WT", "ET"), masks))).
    Returns {"WT", "TC", "ET", ["HD95_WT", ...], "empty_truth", "empty_pred", "policy"}."""
    name, _ = _policy(policy)
    pr, gr = _regions(pred_regions, "pred_regions"), _regions(gt_regions, "gt_regions")
    out = {"policy": name, "empty_truth": [], "empty_pred": []}
    for k in REGIONS:
        p, g = _mask(pr[k], f"pred {k}"), _mask(gr[k], f"truth {k}")
        out[k] = dice(p, g, policy)
        if hd:
            out[f"HD95_{k}"] = hd95(p, g, spacing, policy)
        if not bool(g.any()):
            out["empty_truth"].append(k)
        if not bool(p.any()):
            out["empty_pred"].append(k)
    return out


def seg_case(case, pred_regions, gt_regions, subset=None, policy="brats", spacing=None, hd=False):
    """brats_seg_metrics of one case tagged with its id and the subset of available modalities
    (a tuple of names), the rows brats_summary and missing_modality_table expect."""
    out = {"case": case, **brats_seg_metrics(pred_regions, gt_regions, policy, spacing, hd)}
    if subset is not None:
        out["subset"] = tuple(subset)
    return out


def _nanmean(values):
    v = [float(x) for x in values if not math.isnan(float(x))]
    return sum(v) / len(v) if v else math.nan


def _std(values):
    v = [float(x) for x in values if not math.isnan(float(x))]
    if len(v) < 2:
        return math.nan if not v else 0.0
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def brats_summary(cases):
    """Mean Dice (and HD95) per region over cases from brats_seg_metrics, NaN values left out,
    with the policy and the counts of empty truths, empty predictions and excluded values."""
    if not cases:
        raise ValueError("brats_summary: no cases")
    policies = {c["policy"] for c in cases}
    if len(policies) != 1:
        raise ValueError(f"brats_summary: cases were scored under different empty policies {sorted(policies)}")
    out = {"policy": policies.pop(), "n": len(cases)}
    for k in REGIONS:
        for key in (k, f"HD95_{k}"):
            if key in cases[0]:
                vals = [c[key] for c in cases]
                out[key] = _nanmean(vals)
                out[f"n_excluded_{key}"] = sum(math.isnan(v) for v in vals)
        out[f"n_empty_truth_{k}"] = sum(k in c["empty_truth"] for c in cases)
        out[f"n_empty_pred_{k}"] = sum(k in c["empty_pred"] for c in cases)
    return out


# ---------------------------------------------------------------------------------------------
# AutoPET: connected components and case-level metrics


def _neighbour_offsets(connectivity):
    """Half of the neighbourhood (each undirected edge once): offsets with |d|_1 <= 1, 2 or 3."""
    order = {6: 1, 18: 2, 26: 3}
    if connectivity not in order:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    offs = [o for o in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(map(abs, o)) <= order[connectivity]]
    return [o for o in offs if o > (0, 0, 0)]


@_one_thread()
def connected_components(mask, connectivity=18):
    """Labels (D, H, W) int64, 0 = background, components numbered 1..n, and n.
    Union-find on the voxel graph in torch: every round hooks the larger of two linked roots
    onto the smaller, then pointer jumping flattens the trees; a few rounds suffice."""
    m = _mask(mask, "connected_components mask")
    if m.ndim != 3:
        raise ValueError(f"connected_components: expected a (D, H, W) mask, got shape {tuple(m.shape)}")
    coords = torch.nonzero(m)  # (n, 3)
    n = coords.shape[0]
    labels = torch.zeros(m.shape, dtype=torch.int64, device=m.device)
    if n == 0:
        return labels, 0
    # voxel ids in a volume padded by one, so every neighbour lookup stays inside it
    D, H, W = m.shape
    ids = torch.full(((D + 2) * (H + 2) * (W + 2),), -1, dtype=torch.int64, device=m.device)
    flat = ((coords[:, 0] + 1) * (H + 2) + coords[:, 1] + 1) * (W + 2) + coords[:, 2] + 1
    ids[flat] = torch.arange(n, device=m.device)
    src, dst = [], []
    for dz, dy, dx in _neighbour_offsets(connectivity):
        nb = ids[flat + (dz * (H + 2) + dy) * (W + 2) + dx]
        linked = nb >= 0
        src.append(torch.nonzero(linked)[:, 0])
        dst.append(nb[linked])
    src, dst = torch.cat(src), torch.cat(dst)
    parent = torch.arange(n, device=m.device)
    while True:
        ps, pd = parent[src], parent[dst]
        differ = ps != pd
        if not bool(differ.any()):
            break
        hi, lo = torch.maximum(ps, pd)[differ], torch.minimum(ps, pd)[differ]
        parent.scatter_reduce_(0, hi, lo, reduce="amin")
        while True:  # pointer jumping until every voxel points at its root
            nxt = parent[parent]
            if torch.equal(nxt, parent):
                break
            parent = nxt
    roots, comp = torch.unique(parent, return_inverse=True)
    labels[tuple(coords.T)] = comp + 1
    return labels, int(roots.numel())


def _unmatched_volume(a, b, connectivity):
    """Voxels of the components of a that touch no voxel of b."""
    lab, n = connected_components(a, connectivity)
    if n == 0:
        return 0
    sizes = torch.bincount(lab[a], minlength=n + 1)
    hit = torch.zeros(n + 1, dtype=torch.bool, device=a.device)
    hit[lab[a & b]] = True
    return int(sizes[~hit].sum().item())


def autopet_case_metrics(pred, gt, spacing):
    """AutoPET metrics of one case (binary lesion masks, spacing in mm): Dice under the AutoPET
    policy (NaN for a true negative, 0 for a false positive on a negative case), false-positive
    volume (predicted 18-connected components touching no true voxel) and false-negative volume
    (true components touching no predicted voxel) in mL, and the case-level flags."""
    p, g = _mask(pred, "autopet pred"), _mask(gt, "autopet gt").to(_tensor(pred).device)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"autopet_case_metrics: expected two (D, H, W) masks of one shape, "
                         f"got {tuple(p.shape)} and {tuple(g.shape)}")
    ml = math.prod(_spacing(spacing, "autopet_case_metrics")) / 1000.0
    return dict(dice=dice(p, g, "autopet"), fp_volume_ml=_unmatched_volume(p, g, 18) * ml,
                fn_volume_ml=_unmatched_volume(g, p, 18) * ml, gt_positive=bool(g.any()),
                pred_positive=bool(p.any()), policy="autopet")


def autopet_summary(cases):
    """Table 8 numbers over cases from autopet_case_metrics: Dice over all cases but true
    negatives (a false positive on a negative case scores 0), Dice- over lesion cases, case-level
    TPR/TNR/FNR/FPR (a case is positive when its truth has a lesion, predicted positive when the
    prediction has a lesion voxel), mean false-positive and false-negative volume in mL."""
    if not cases:
        raise ValueError("autopet_summary: no cases")
    gt = torch.tensor([c["gt_positive"] for c in cases])
    pr = torch.tensor([c["pred_positive"] for c in cases])
    rates = confusion_rates(pr, gt)
    return dict(
        dice=_nanmean(c["dice"] for c in cases),
        dice_minus=_nanmean(c["dice"] for c in cases if c["gt_positive"]),
        tpr=rates["tpr"], tnr=rates["tnr"], fnr=rates["fnr"], fpr=rates["fpr"],
        fp_volume_ml=_nanmean(c["fp_volume_ml"] for c in cases),
        fn_volume_ml=_nanmean(c["fn_volume_ml"] for c in cases),
        n=len(cases), n_positive=int(gt.sum()), n_negative=int((~gt).sum()),
        n_true_negative=rates["tn"], policy="autopet")


# ---------------------------------------------------------------------------------------------
# Sliding-window inference


def _window_starts(size, roi, overlap):
    """Window starts along one axis: stride int(roi * (1 - overlap)) (at least 1), the last
    window flush with the end (MONAI's placement)."""
    if roi >= size:
        return [0]
    stride = max(int(roi * (1 - overlap)), 1)
    n = next(k for k in range(1, size + 1) if (k - 1) * stride + roi >= size)
    return [min(k * stride, size - roi) for k in range(n)]


def importance_map(roi, blend="gaussian", sigma_scale=0.125, device=None):
    """Window weights (float64): Gaussian with sigma = sigma_scale * roi per axis centred on the
    window (floored at max(min, 1e-3) so no voxel gets weight 0), or constant 1."""
    if blend == "constant":
        return torch.ones(roi, dtype=torch.float64, device=device)
    if blend != "gaussian":
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    w = None
    for r in roi:
        x = torch.arange(r, dtype=torch.float64, device=device) - (r - 1) / 2.0
        g = torch.exp(-x ** 2 / (2 * (sigma_scale * r) ** 2))
        w = g if w is None else w[..., None] * g
    return w.clamp(min=max(w.min().item(), 1e-3))


@torch.no_grad()
def sliding_window_inference(fn, image, roi, overlap=0.5, sw_batch_size=4, blend="gaussian",
                             sigma_scale=0.125, out_channels=None, device=None, stitch_device=None):
    """Whole-volume inference: fn maps (n, C, *roi) -> (n, K, *roi); image is (C, D, H, W) or
    (1, C, D, H, W) of any size (zero-padded symmetrically where smaller than roi, cropped
    back). Windows run in batches of sw_batch_size on `device` (default: the image's); outputs
    are blended with the importance map and stitched on `stitch_device` (default: the image's;
    "cpu" keeps the full-size accumulators off the GPU). Accumulation is float64, so an identity
    fn gives back a float32 input exactly. Returns the output in fn's dtype, shaped like image."""
    x = _tensor(image, "sliding_window_inference image")
    batched = x.ndim == 5
    if batched:
        if x.shape[0] != 1:
            raise ValueError(f"sliding_window_inference: batch size must be 1, got shape {tuple(x.shape)}")
        x = x[0]
    if x.ndim != 4:
        raise ValueError(f"sliding_window_inference: image must be (C, D, H, W) or (1, C, D, H, W), "
                         f"got {tuple(x.shape)}")
    roi = (int(roi),) * 3 if np.isscalar(roi) else tuple(int(r) for r in roi)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"sliding_window_inference: roi must be 3 positive sizes, got {roi}")
    if not 0 <= overlap < 1:
        raise ValueError(f"sliding_window_inference: overlap must be in [0, 1), got {overlap}")
    device = torch.device(device) if device is not None else x.device
    stitch = torch.device(stitch_device) if stitch_device is not None else x.device
    size = tuple(x.shape[1:])
    pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, size)]
    if any(a or b for a, b in pad):
        x = F.pad(x, [v for ab in reversed(pad) for v in ab])
    full = tuple(x.shape[1:])
    weight = importance_map(roi, blend, sigma_scale, stitch)
    windows = list(itertools.product(*[_window_starts(s, r, overlap) for s, r in zip(full, roi)]))
    acc, norm, out_dtype = None, torch.zeros(full, dtype=torch.float64, device=stitch), None
    for i in range(0, len(windows), sw_batch_size):
        batch = windows[i:i + sw_batch_size]
        xb = torch.stack([x[:, a:a + roi[0], b:b + roi[1], c:c + roi[2]] for a, b, c in batch]).to(device)
        yb = fn(xb)
        got = tuple(yb.shape) if isinstance(yb, torch.Tensor) else type(yb).__name__
        if not isinstance(yb, torch.Tensor) or yb.ndim != 5 or yb.shape[0] != len(batch) or got[2:] != roi:
            raise ValueError(f"sliding_window_inference: fn must map (n, C, *roi) to (n, K, *roi); "
                             f"for input {tuple(xb.shape)} it returned {got}")
        if acc is None:
            k = yb.shape[1]
            if out_channels is not None and k != out_channels:
                raise ValueError(f"sliding_window_inference: fn returned {k} channels, expected {out_channels}")
            acc, out_dtype = torch.zeros((k,) + full, dtype=torch.float64, device=stitch), yb.dtype
        yb = yb.to(stitch, torch.float64) * weight
        for j, (a, b, c) in enumerate(batch):
            acc[:, a:a + roi[0], b:b + roi[1], c:c + roi[2]] += yb[j]
            norm[a:a + roi[0], b:b + roi[1], c:c + roi[2]] += weight
    out = (acc / norm)[(slice(None), *[slice(a, a + s) for (a, _), s in zip(pad, size)])]
    out = out.to(out_dtype)
    return out[None] if batched else out


# ---------------------------------------------------------------------------------------------
# Tables (Markdown, CSV, JSON)

MODALITY_ORDER = ("t1", "t1ce", "t2", "flair", "ct", "pet")


def _ordered(names):
    """Unique names, known modalities first in MODALITY_ORDER, the rest in order of appearance."""
    seen = list(dict.fromkeys(names))
    known = [m for m in MODALITY_ORDER if m in seen]
    return known + [m for m in seen if m not in known]


def _label(name):
    return {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "Flair", "ct": "CT", "pet": "PET"}.get(name, name)


def transfer_matrix_table(results):
    """Table 10: per source a "mean" and a "std" row, per target PSNR, NMSE and SSIM over cases.
    results: dicts with source, target, psnr, nmse, ssim (one per case and pair)."""
    if not results:
        raise ValueError("transfer_matrix_table: no results")
    sources = _ordered(r["source"] for r in results)
    targets = _ordered(r["target"] for r in results)
    rows = []
    for s in sources:
        for stat, fn in (("mean", _nanmean), ("std", _std)):
            row = {"source": _label(s), "stat": stat}
            for t in targets:
                sel = [r for r in results if r["source"] == s and r["target"] == t]
                for k in ("psnr", "nmse", "ssim"):
                    row[f"{_label(t)} {k.upper()}"] = fn(r[k] for r in sel) if sel else math.nan
            rows.append(row)
    return rows


def transfer_summary_table(results, pairs=(("t1", "t2"), ("t2", "flair"))):
    """Table 9: one row per method (results' "method", default "ours"), for each source -> target
    pair the mean and std of PSNR, NMSE and SSIM (Markdown shows them as mean ± std)."""
    if not results:
        raise ValueError("transfer_summary_table: no results")
    rows = []
    for method in dict.fromkeys(r.get("method", "ours") for r in results):
        row = {"method": method}
        for s, t in pairs:
            sel = [r for r in results if r.get("method", "ours") == method and r["source"] == s and r["target"] == t]
            for k in ("psnr", "nmse", "ssim"):
                col = f"{_label(s)}->{_label(t)} {k.upper()}"
                row[col] = _nanmean(r[k] for r in sel) if sel else math.nan
                row[f"{col} std"] = _std(r[k] for r in sel) if sel else math.nan
        rows.append(row)
    return rows


def missing_modality_table(results, modalities=None, regions=REGIONS):
    """Table 11: one row per subset of available modalities (15 for four MRI modalities, 3 for
    CT/PET; smallest subsets first) with "x" under each present modality, the mean Dice (%) of
    each region (keys of the results, WT/TC/ET by default) and their average, the case count
    and the count of (case, region) pairs with an empty truth; then the mean over the subset
    rows. results: dicts from seg_case with a "subset" (tuple of names, or "t1+t2")."""
    if not results:
        raise ValueError("missing_modality_table: no results")

    def key(r):
        s = r["subset"]
        return tuple(s.split("+")) if isinstance(s, str) else tuple(s)
    mods = list(modalities) if modalities is not None else _ordered(m for r in results for m in key(r))
    unknown = {m for r in results for m in key(r)} - set(mods)
    if unknown:
        raise ValueError(f"missing_modality_table: subsets use modalities {sorted(unknown)} not in {mods}")
    subsets = sorted({frozenset(key(r)) for r in results}, key=lambda s: (len(s), sorted(mods.index(m) for m in s)))
    rows = []
    for sub in subsets:
        sel = [r for r in results if frozenset(key(r)) == sub]
        row = {"subset": "+".join(_label(m) for m in mods if m in sub)}
        row.update({_label(m): ("x" if m in sub else "") for m in mods})
        for k in regions:
            row[k] = 100.0 * _nanmean(r[k] for r in sel)
        row["mean"] = _nanmean(row[k] for k in regions)
        row["n"] = len(sel)
        row["empty truth"] = sum(len(r.get("empty_truth", [])) for r in sel)
        rows.append(row)
    mean = {"subset": "mean", **{_label(m): "" for m in mods}}
    for k in (*regions, "mean"):
        mean[k] = _nanmean(r[k] for r in rows)
    mean["n"] = sum(r["n"] for r in rows)
    mean["empty truth"] = sum(r["empty truth"] for r in rows)
    return rows + [mean]


def autopet_table(results):
    """Table 8: one row per method (results' "method", default "ours") from autopet_summary:
    Dice, Dice-, TPR, TNR, FNR, FPR in %, FP and FN volume in mL, case counts."""
    if not results:
        raise ValueError("autopet_table: no results")
    rows = []
    for method in dict.fromkeys(r.get("method", "ours") for r in results):
        s = autopet_summary([r for r in results if r.get("method", "ours") == method])
        rows.append({"method": method, "Dice": 100 * s["dice"], "Dice-": 100 * s["dice_minus"],
                     "TPR": 100 * s["tpr"], "TNR": 100 * s["tnr"], "FNR": 100 * s["fnr"], "FPR": 100 * s["fpr"],
                     "FP vol (mL)": s["fp_volume_ml"], "FN vol (mL)": s["fn_volume_ml"],
                     "cases": s["n"], "true negatives": s["n_true_negative"]})
    return rows


def git_commit():
    """Commit of the working tree (with "+dirty" if it has changes), or "unknown"."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return _json_value(v.item())
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _json_value(v.item())
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def _markdown(rows, columns, digits):
    """Markdown table; a column "X" followed by "X std" is shown as "mean ± std"."""
    shown = [c for c in columns if not (c.endswith(" std") and c[:-4] in columns)]

    def fmt(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        cells = []
        for c in shown:
            cell = fmt(r[c])
            if f"{c} std" in columns and isinstance(r[f"{c} std"], float) and not math.isnan(r[f"{c} std"]):
                cell += f" ± {fmt(r[f'{c} std'])}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows, columns, path_stem, meta=None, digits=3):
    """Writes rows (dicts) as path_stem.md, .csv and .json. columns: the keys in order (None:
    the first row's). The JSON holds columns, rows and meta: protocol, policy, seed, commit (git
    rev-parse, or "unknown"), config, plus any other meta keys. All three files are written to
    temporary names first and renamed only when all succeeded. Returns the three paths."""
    stem = Path(path_stem)
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"write_table {stem}: rows must be a non-empty list of dicts")
    columns = list(rows[0]) if columns is None else list(columns)
    for i, r in enumerate(rows):
        missing = [c for c in columns if c not in r]
        if missing:
            raise ValueError(f"write_table {stem}: row {i} lacks columns {missing}")
    meta = dict(meta or {})
    for k in ("protocol", "policy", "seed", "config"):
        meta.setdefault(k, None)
    if not meta.get("commit"):
        meta["commit"] = git_commit()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns])
    texts = {
        ".md": _markdown(rows, columns, digits),
        ".csv": buf.getvalue(),
        ".json": json.dumps(_json_value({"columns": columns, "rows": [{c: r[c] for c in columns} for r in rows],
                                         "meta": meta}), indent=2, allow_nan=False) + "\n",
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmps = {}
    try:
        for ext, text in texts.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{stem.name}", suffix=ext + ".tmp", dir=stem.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            tmps[ext] = tmp
        for ext, tmp in tmps.items():
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, str(stem) + ext)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [Path(str(stem) + ext) for ext in texts]


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas directly: no pyplot, no global backend change)


def _numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _volume(x, name):
    a = _numpy(x)
    if a.ndim != 3:
        raise ValueError(f"{name}: expected a (D, H, W) volume, got shape {a.shape}")
    return a


VIEWS = ("axial", "coronal", "sagittal")


def _mid_slices(a):
    """Axial (fixed z), coronal (fixed y), sagittal (fixed x) mid-slices, oriented for imshow
    with origin="lower" (anterior or superior up)."""
    d, h, w = a.shape
    return [a[:, :, w // 2].T, a[:, h // 2, :].T, a[d // 2, :, :].T]


def _figure(rows, cols, panel=1.6, dpi=100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(cols * panel, rows * panel), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.04, hspace=0.12)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}", suffix=".png.tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def figure_transfer(path, inputs, preds, truths, names, source_name, dpi=100):
    """Figures 8, 10-12: one row per target modality; columns input, generated, truth and
    signed difference generated - truth (red positive, blue negative, colour scale symmetric
    about 0), each on the axial, coronal and sagittal mid-slices. inputs: the source volume
    (D, H, W) or one per target; preds, truths: (T, D, H, W) or lists of volumes."""
    names = list(names)
    preds = [_volume(p, "figure_transfer pred") for p in preds]
    truths = [_volume(t, "figure_transfer truth") for t in truths]
    ins = _numpy(inputs)
    ins = [ins] * len(names) if ins.ndim == 3 else [_volume(i, "figure_transfer input") for i in ins]
    if not (len(preds) == len(truths) == len(ins) == len(names)) or not names:
        raise ValueError(f"figure_transfer: {len(names)} names, {len(preds)} predictions, {len(truths)} truths, "
                         f"{len(ins)} inputs: they must match and not be empty")
    kinds = (f"input ({source_name})", "generated", "truth", "generated - truth")
    fig, axes = _figure(len(names), 4 * len(VIEWS), dpi=dpi)
    for i, (name, x, p, t) in enumerate(zip(names, ins, preds, truths)):
        if not (x.shape == p.shape == t.shape):
            raise ValueError(f"figure_transfer: shapes differ for {name}: {x.shape}, {p.shape}, {t.shape}")
        lo, hi = np.percentile(t, [1, 99])
        xlo, xhi = np.percentile(x, [1, 99])
        sl = [_mid_slices(a) for a in (x, p, t, p - t)]
        lim = float(max(max(np.abs(s).max() for s in sl[3]), 1e-6))
        for k in range(4):
            for v, view in enumerate(VIEWS):
                ax = axes[i, k * len(VIEWS) + v]
                if k == 3:
                    ax.imshow(sl[k][v], cmap="bwr", vmin=-lim, vmax=lim, origin="lower")
                else:
                    a, b = (xlo, xhi) if k == 0 else (lo, hi)
                    ax.imshow(sl[k][v], cmap="gray", vmin=a, vmax=max(b, a + 1e-6), origin="lower")
                if i == 0:
                    ax.set_title(f"{kinds[k]}\n{view}", fontsize=6)
                if k == 0 and v == 0:
                    ax.set_ylabel(_label(name), fontsize=8)
    return _save(fig, path)


# label value -> colour: BraTS NCR/NET red, edema green, enhancing tumour (3 or 4) yellow
SEG_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.1), 3: (1.0, 0.9, 0.0), 4: (1.0, 0.9, 0.0)}


def figure_segmentation(path, image, pred_label, gt_label, dpi=100, alpha=0.45):
    """Overlay of label maps on an image: row 1 ground truth, row 2 prediction, columns axial,
    coronal and sagittal mid-slices through the centre of the truth (of the volume if empty)."""
    from matplotlib.colors import ListedColormap
    img = _volume(image, "figure_segmentation image")
    labs = [_volume(gt_label, "figure_segmentation gt_label"), _volume(pred_label, "figure_segmentation pred_label")]
    if not (img.shape == labs[0].shape == labs[1].shape):
        raise ValueError(f"figure_segmentation: shapes differ: image {img.shape}, truth {labs[0].shape}, "
                         f"prediction {labs[1].shape}")
    nz = np.argwhere(labs[0] > 0)
    centre = nz.mean(0).round().astype(int) if len(nz) else np.array(img.shape) // 2

    def slices(a):
        cz, cy, cx = centre
        return [a[:, :, cx].T, a[:, cy, :].T, a[cz, :, :].T]
    cmap = ListedColormap([SEG_COLOURS.get(v, (0.2, 0.4, 1.0)) for v in range(1, 5)])
    lo, hi = np.percentile(img, [1, 99])
    fig, axes = _figure(2, len(VIEWS), panel=2.2, dpi=dpi)
    for i, (lab, title) in enumerate(zip(labs, ("truth", "prediction"))):
        for v, (s_img, s_lab) in enumerate(zip(slices(img), slices(lab))):
            ax = axes[i, v]
            ax.imshow(s_img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), origin="lower")
            ax.imshow(np.ma.masked_equal(np.clip(s_lab, 0, 4), 0), cmap=cmap, vmin=0.5, vmax=4.5,
                      alpha=alpha, origin="lower", interpolation="nearest")
            if i == 0:
                ax.set_title(VIEWS[v], fontsize=8)
            if v == 0:
                ax.set_ylabel(title, fontsize=8)
    return _save(fig, path)


def pca(feats, k=2):
    """Projection of feats (n, c) onto its first k principal axes (float64, centred). Each axis
    is signed so that its largest-magnitude loading is positive, making the result unique."""
    x = _tensor(feats, "pca feats").double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca: expected (n >= 2, c) features, got shape {tuple(x.shape)}")
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:k]
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return x @ (axes * sign).T


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def figure_embedding(path, feats, modality, person, dpi=100):
    """Figure 9: 2-D PCA of features (n, c), colour by modality, marker by person (persons
    beyond the marker list are also written next to their points)."""
    from matplotlib.lines import Line2D
    modality, person = [str(m) for m in modality], [str(p) for p in person]
    f = _tensor(feats, "figure_embedding feats").detach().cpu()
    f = rearrange(f, "n ... -> n (...)")
    if not (len(modality) == len(person) == f.shape[0]):
        raise ValueError(f"figure_embedding: {f.shape[0]} features, {len(modality)} modality and "
                         f"{len(person)} person labels")
    xy = pca(f, 2).numpy()
    mods, people = list(dict.fromkeys(modality)), list(dict.fromkeys(person))
    from matplotlib import colormaps
    colours = colormaps["tab10"]
    fig, axes = _figure(1, 1, panel=4.0, dpi=dpi)
    ax = axes[0, 0]
    fig.subplots_adjust(left=0.08, right=0.72, bottom=0.08, top=0.92)
    for i, (m, p) in enumerate(zip(modality, person)):
        j = people.index(p)
        ax.scatter(xy[i, 0], xy[i, 1], color=colours(mods.index(m) % 10), marker=MARKERS[j % len(MARKERS)], s=28)
        if j >= len(MARKERS):
            ax.annotate(p, xy[i], fontsize=5)
    handles = [Line2D([], [], color=colours(i % 10), marker="o", linestyle="", label=m) for i, m in enumerate(mods)]
    handles += [Line2D([], [], color="0.4", marker=MARKERS[j % len(MARKERS)], linestyle="", label=p)
                for j, p in enumerate(people[:len(MARKERS)])]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("PCA of X_h' (colour: modality, marker: person)", fontsize=8)
    ax.set_xlabel("PC 1", fontsize=7)
    ax.set_ylabel("PC 2", fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Command line: a tuned checkpoint on held-out persons -> tables, per-case results, NIfTI, PNG

USAGE = """python evaluate.py --ckpt RUN/best.pt --data PATH|demo|demo-petct --task transfer|seg --out DIR
       [--split test|val|all] [--overlap 0.5] [--sw-batch-size 4] [--protocol reference,strict[,brasyn]]
       [--policy brats|monai|autopet] [--subsets all|given] [--save-nifti | --no-save-nifti] [--figures N]
       [--hd95] [--modalities a,b] [--cache DIR] [--device auto] [--seed 0]"""

OUTPUTS = """Outputs under DIR: table10_transfer_<protocol> and table9_transfer_<protocol> (transfer) or
table11_missing_modality and, for AutoPET, table8_autopet (seg), each as .md, .csv and .json;
results.json (per-case numbers, summaries, protocol, policy, seed, commit, configuration);
nifti/<case>/ (predictions on the input's grid, affine and header: transfer outputs in the
data layer's normalised units, segmentations as label maps in the dataset's convention);
figures/ (the first N cases, and the PCA of X_h' of every evaluated person; none with
--figures 0). Everything is
written in a hidden folder beside DIR and moved into DIR only when the whole run succeeded."""


def regions_to_label(masks, regions):
    """Region masks (K, D, H, W) in the channel order of `regions` (name -> label values, as
    data.py's specs hold them) -> a uint8 label map in the dataset's convention. Each region
    paints the one value it holds that no region nested in it holds, outer regions first:
    BraTS WT - TC -> 2, TC - ET -> 1, ET -> 4 (3 for BraTS 2023); AutoPET lesion -> 1."""
    masks = np.asarray(masks)
    if masks.ndim != 4 or masks.shape[0] != len(regions):
        raise ValueError(f"regions_to_label: expected ({len(regions)}, D, H, W) masks for the regions "
                         f"{list(regions)}, got shape {masks.shape}")
    sets = {k: frozenset((1,) if v is None else v) for k, v in regions.items()}
    label = np.zeros(masks.shape[1:], np.uint8)
    for k in sorted(sets, key=lambda k: -len(sets[k])):  # stable: ties keep the channel order
        inner = set().union(*[s for j, s in sets.items() if j != k and s < sets[k]])
        own = sets[k] - inner
        if len(own) != 1:
            raise ValueError(f"regions_to_label: region {k!r} {sorted(sets[k])} does not own exactly one label "
                             f"value (nested regions hold {sorted(inner)}); cannot write a label map")
        label[masks[list(regions).index(k)] > 0] = next(iter(own))
    return label


def _source_spacing(record):
    """Voxel spacing (mm) along the original image axes (the record lists it in RAS order)."""
    out = [0.0] * 3
    for j, p in enumerate(record["perm"]):
        out[p] = float(record["spacing"][j])
    return out


def _subsets(inputs, which):
    """Every non-empty subset of the inputs, smallest first (15 for 4, 3 for 2), or the inputs."""
    if which == "given":
        return [list(inputs)]
    return [list(s) for k in range(1, len(inputs) + 1) for s in itertools.combinations(inputs, k)]


def _parse_args(argv):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=USAGE[len("python "):],
                                 epilog=OUTPUTS, formatter_class=Formatter)
    ap.add_argument("--ckpt", required=True, help="tuned checkpoint of train_downstream.py (OUT/best.pt or last.pt)")
    ap.add_argument("--data", required=True, help="dataset folder, datalist JSON, 'demo' or 'demo-petct'")
    ap.add_argument("--task", choices=("transfer", "seg"), default=None, help="the checkpoint's task (checked)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--split", choices=("test", "val", "all"), default="test",
                    help="cases: the checkpoint's test or val split, or every case of --data")
    ap.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (the reference used 0.75)")
    ap.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward")
    ap.add_argument("--protocol", default="reference,strict", help="transfer protocols: reference, strict, brasyn")
    ap.add_argument("--policy", choices=sorted(EMPTY_POLICIES), default=None,
                    help="empty-mask policy of Dice/HD95 (default: autopet for AutoPET labels, else brats)")
    ap.add_argument("--subsets", choices=("all", "given"), default="all",
                    help="seg: every non-empty subset of the input modalities, or only all of them together")
    ap.add_argument("--save-nifti", action=argparse.BooleanOptionalAction, default=True,
                    help="write predictions as NIfTI on the input's grid")
    ap.add_argument("--figures", type=int, default=2, help="PNG figures for the first N cases (0: no figures)")
    ap.add_argument("--hd95", action="store_true", help="seg: also HD95 per region (results.json)")
    ap.add_argument("--modalities", default="", help="the data's channels, in order (default: the checkpoint's)")
    ap.add_argument("--cache", default="", help="preprocessed-data cache folder (default: data.py's)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu | cuda:N")
    ap.add_argument("--seed", type=int, default=0, help="recorded with the results (inference is deterministic)")
    args = ap.parse_args(argv)
    args.protocol = [p.strip() for p in args.protocol.split(",") if p.strip()]
    bad = [p for p in args.protocol if p not in ("reference", "strict", "brasyn")]
    if bad or not args.protocol or len(set(args.protocol)) != len(args.protocol):
        raise SystemExit(f"--protocol {','.join(args.protocol)}: choose distinct protocols among reference, strict, "
                         "brasyn")
    if not 0 <= args.overlap < 1 or args.sw_batch_size < 1 or args.figures < 0:
        raise SystemExit("--overlap must be in [0, 1), --sw-batch-size >= 1 and --figures >= 0")
    return args


def _load_volume(data, spec, case_id, cache):
    """Reads, checks and preprocesses one case; bad input stops with data.py's one-line message
    (it names the file and the problem)."""
    try:
        return data.load_case(spec.case(case_id), spec, cache)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(" ".join(str(e).split()).strip("'\"")) from None


def _to(x, dev):
    return torch.from_numpy(np.ascontiguousarray(x)).to(dev)


def _transfer_case(T, data, net, vol, meta, args, dev, stage, figures):
    """Every single source -> every target of one case: rows of transfer_metrics per protocol
    (scored on the original grid), NIfTI per source and target, one figure per source."""
    names, sources, targets, rec = meta["modalities"], meta["inputs"], meta["targets"], vol.record
    image = torch.from_numpy(np.array(vol.image, dtype=np.float32)).to(dev)  # a copy: the cache is read-only
    preds = T.predict_subsets(net, image, [[s] for s in sources], meta, overlap=args.overlap,
                              sw_batch_size=args.sw_batch_size, device=dev)
    truth = {t: _to(data.restore(vol.image[names.index(t)], rec, data.pad_value(t)), dev) for t in targets}
    fg = _to(data.restore(np.asarray(vol.fg, dtype=bool), rec), dev)
    tumour = None if vol.label is None else _to(data.restore(np.asarray(vol.label) > 0, rec), dev)
    rows = []
    for s, pred in zip(sources, preds):
        pred = pred.float().cpu().numpy()  # (T, D, H, W) on the preprocessed grid
        source = _to(data.restore(vol.image[names.index(s)], rec, data.pad_value(s)), dev)
        for k, t in enumerate(targets):
            p = data.restore(pred[k], rec, data.pad_value(t))
            if args.save_nifti:
                data.write_nifti(p, rec, stage / "nifti" / vol.id / f"{vol.id}_{s}_to_{t}.nii.gz", grid="original")
            p = _to(p, dev)
            for protocol in args.protocol:
                m = transfer_metrics(p, truth[t], fg, protocol, tumour if protocol == "brasyn" else None)
                # identity baseline: the normalised source itself as the prediction of the target
                base = transfer_metrics(source, truth[t], fg, protocol, tumour if protocol == "brasyn" else None)
                m.update({f"identity_{key}": base[key] for key in ("psnr", "nmse", "ssim")})
                rows.append({"case": vol.id, "source": s, "target": t, **m})
        if figures:
            figure_transfer(stage / "figures" / f"{vol.id}_from_{s}.png", vol.image[names.index(s)], pred,
                            [vol.image[names.index(t)] for t in targets], targets, s)
    return rows


def _seg_case(T, data, net, vol, meta, regions, args, dev, stage, figures):
    """Every subset of the inputs on one case: region masks (logits > 0) made into a label map
    in the dataset's convention, restored to the original grid and scored there by the regions
    of that map (what a challenge scores from a submitted file, so the numbers can be
    recomputed from the NIfTI output; where predicted regions are not nested this differs from
    scoring the channels): BraTS Dice per region, or Dice per region plus the AutoPET case
    metrics. The label map of all inputs together is written as NIfTI and drawn."""
    if vol.label is None:
        raise SystemExit(f"{vol.record['source']}: case {vol.id} has no label file; --task seg needs labels")
    rec, names = vol.record, list(regions)
    image = torch.from_numpy(np.array(vol.image, dtype=np.float32)).to(dev)
    subsets = _subsets(meta["inputs"], args.subsets)
    logits = T.predict_subsets(net, image, subsets, meta, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                               device=dev)
    truth = _to(data.label_to_regions(data.restore(np.asarray(vol.label), rec), regions) > 0.5, dev)
    spacing = _source_spacing(rec)
    brats = sorted(n.upper() for n in names) == sorted(REGIONS)
    rows = []
    for sub, lg in zip(subsets, logits):
        pre = regions_to_label((lg > 0).cpu().numpy(), regions)  # (D, H, W) on the preprocessed grid
        label = data.restore(pre, rec)  # (X, Y, Z) on the original grid
        masks = _to(data.label_to_regions(label, regions) > 0.5, dev)
        if brats:
            row = seg_case(vol.id, {n.upper(): masks[k] for k, n in enumerate(names)},
                           {n.upper(): truth[k] for k, n in enumerate(names)}, sub, args.policy, spacing, args.hd95)
        else:
            row = {"case": vol.id, "subset": tuple(sub), "policy": args.policy,
                   "empty_truth": [n for k, n in enumerate(names) if not bool(truth[k].any())],
                   "empty_pred": [n for k, n in enumerate(names) if not bool(masks[k].any())]}
            for k, n in enumerate(names):
                row[n] = dice(masks[k], truth[k], args.policy)
                if args.hd95:
                    row[f"HD95_{n}"] = hd95(masks[k], truth[k], spacing, args.policy)
        if meta["label_kind"] == "autopet":
            row["autopet"] = autopet_case_metrics(masks[0], truth[0], spacing)
        rows.append(row)
        if sub == list(meta["inputs"]):
            if args.save_nifti:
                data.write_nifti(label, rec, stage / "nifti" / vol.id / f"{vol.id}_seg.nii.gz", grid="original")
            if figures:
                show = next((m for m in ("flair", "t1ce", "pet") if m in meta["inputs"]), meta["inputs"][0])
                figure_segmentation(stage / "figures" / f"{vol.id}_seg.png", vol.image[meta["modalities"].index(show)],
                                    pre, np.asarray(vol.label))
    return rows


@torch.no_grad()
def _embedding(T, data, net, vol, meta, dev):
    """X_h' (flattened) of each input modality of one person, from the central roi crop."""
    names, roi = meta["modalities"], tuple(meta["roi"])
    x = torch.from_numpy(np.array(vol.image, dtype=np.float32))
    pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, x.shape[1:])]
    flat = [v for ab in reversed(pad) for v in ab]
    x = torch.stack([F.pad(x[c], flat, value=data.pad_value(m)) for c, m in enumerate(names)])
    lo = [(s - r) // 2 for s, r in zip(x.shape[1:], roi)]
    x = x[:, lo[0]:lo[0] + roi[0], lo[1]:lo[1] + roi[1], lo[2]:lo[2] + roi[2]][None].to(dev)  # (1, |M|, *roi)
    feats = []
    for m in meta["inputs"]:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            xh, _ = T.encode(net, T.single(x, names.index(m)))
        feats.append(rearrange(xh.float(), "1 c d h w -> (c d h w)").cpu())
    return feats


def _write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(_json_value(obj), indent=1, allow_nan=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _transfer_tables(rows, meta, args, stage, info):
    """Tables 10 and 9 per protocol; returns [(title, path stem)] and the per-pair summary."""
    written, summary = [], {}
    pairs = [(s, t) for s, t in (("t1", "t2"), ("t2", "flair")) if s in meta["inputs"] and t in meta["targets"]]
    for protocol in args.protocol:
        sel = [r for r in rows if r["protocol"] == protocol]
        tmeta = dict(info, protocol=protocol)
        stem = stage / f"table10_transfer_{protocol}"
        write_table(transfer_matrix_table(sel), None, stem, tmeta)
        written.append((f"Table 10 ({protocol} protocol): source x target, mean and std over cases", stem))
        if pairs:
            stem = stage / f"table9_transfer_{protocol}"
            write_table(transfer_summary_table(sel, pairs), None, stem, tmeta)
            shown = ", ".join(f"{_label(s)}->{_label(t)}" for s, t in pairs)
            written.append((f"Table 9 ({protocol} protocol): {shown}", stem))
        keys = [k for k, v in sel[0].items() if isinstance(v, float) and k != "data_range"]
        summary[protocol] = {f"{s}>{t}": {k: _nanmean(r[k] for r in sel if (r["source"], r["target"]) == (s, t))
                                          for k in keys}
                             for s, t in dict.fromkeys((r["source"], r["target"]) for r in sel)}
    return written, summary


def _seg_tables(rows, meta, regions, args, stage, info):
    """Table 11 (and Table 8 for AutoPET); returns [(title, path stem)] and the per-subset summary."""
    names = list(regions)
    brats = sorted(n.upper() for n in names) == sorted(REGIONS)
    stem = stage / "table11_missing_modality"
    table = missing_modality_table(rows, meta["inputs"], REGIONS if brats else tuple(names))
    write_table(table, None, stem, info)
    n_empty = table[-1]["empty truth"]
    written = [(f"Table 11: Dice (%) per subset of the inputs, empty-mask policy {args.policy}, "
                f"{n_empty} (case, subset, region) triples with an empty truth", stem)]
    summary = {}
    for sub in dict.fromkeys(tuple(r["subset"]) for r in rows):
        sel = [r for r in rows if tuple(r["subset"]) == sub]
        key = "+".join(sub)
        if brats:
            summary[key] = brats_summary(sel)
        else:
            summary[key] = {n: _nanmean(r[n] for r in sel) for n in names}
        if meta["label_kind"] == "autopet":
            summary[key]["autopet"] = autopet_summary([r["autopet"] for r in sel])
    if meta["label_kind"] == "autopet":
        ap_rows = [{**r["autopet"], "method": "+".join(_label(m) for m in r["subset"])} for r in rows]
        stem = stage / "table8_autopet"
        write_table(autopet_table(ap_rows), None, stem, dict(info, policy="autopet"))
        written.append(("Table 8: AutoPET, one row per subset of the inputs", stem))
    return written, summary


def _publish(stage, out):
    """Moves every file of the finished staging folder into out (replacing older ones)."""
    for f in sorted(p for p in stage.rglob("*") if p.is_file()):
        dest = out / f.relative_to(stage)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)


def main(argv=None):
    args = _parse_args(argv)
    # imported here, not at the top: train_downstream imports this module
    import data
    import train_downstream as T

    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2 ** 32)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    try:
        net, meta = T.load_tuned(args.ckpt, dev)
    except (ValueError, SystemExit) as e:  # one line: torch's unpickling errors span paragraphs
        raise SystemExit(" ".join(str(e).split())[:400]) from None
    task = args.task or meta["task"]
    if task != meta["task"]:
        raise SystemExit(f"--task {task}: {args.ckpt} was tuned for {meta['task']}")
    if args.policy is None:
        args.policy = "autopet" if meta["label_kind"] == "autopet" else "brats"
    want = [m for m in args.modalities.split(",") if m.strip()] or meta["modalities"]
    try:
        spec = data.resolve(args.data, want)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{' '.join(str(e).split())} (the checkpoint needs {','.join(meta['modalities'])})") from None
    problems = data.compare_contract(meta["contract"], data.contract(spec))
    if problems:
        raise SystemExit(f"{args.ckpt}: the data differ from the tuning data: {'; '.join(problems)}")
    regions = dict(spec.regions)
    if task == "seg" and list(regions) != list(meta["regions"]):
        raise SystemExit(f"{spec.root}: the data's regions {list(regions)} differ from the checkpoint's "
                         f"{list(meta['regions'])}")
    ids = sorted(c.id for c in spec.cases) if args.split == "all" else list(meta["split"][args.split])
    if not ids:
        raise SystemExit(f"{args.ckpt}: the checkpoint's {args.split} split is empty (--split all evaluates every "
                         "case of --data)")
    known = {c.id for c in spec.cases}
    missing = [i for i in ids if i not in known]
    if missing:
        raise SystemExit(f"{spec.root}: no cases {', '.join(missing[:5])} of the checkpoint's {args.split} split "
                         "(another dataset? --split all evaluates every case of --data)")
    cache = Path(args.cache) if args.cache else None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out}: exists and is not a folder")
    personalized = hasattr(net, "personalize")
    config = dict(vars(args))
    config.update(ckpt_step=meta["step"], arch=meta["arch"], modalities=meta["modalities"], inputs=meta["inputs"],
                  targets=meta["targets"], regions=meta["regions"], roi=meta["roi"], init=meta.get("init"),
                  data_root=str(spec.root), layout=spec.layout, device=str(dev))
    info = {"policy": args.policy if task == "seg" else None, "protocol": args.protocol if task == "transfer" else None,
            "seed": args.seed, "commit": git_commit(), "config": config, "split": args.split, "cases": ids}

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        rows, feats, who, which = [], [], [], []
        for n, cid in enumerate(tqdm(ids, desc=f"evaluate {task}", unit="case", dynamic_ncols=True)):
            vol = _load_volume(data, spec, cid, cache)
            figures = n < args.figures
            try:
                if task == "transfer":
                    rows += _transfer_case(T, data, net, vol, meta, args, dev, stage, figures)
                else:
                    rows += _seg_case(T, data, net, vol, meta, regions, args, dev, stage, figures)
            except ValueError as e:
                raise SystemExit(f"case {cid} ({vol.record['source']}): {' '.join(str(e).split())}") from None
            if args.figures and personalized:
                for m, f in zip(meta["inputs"], _embedding(T, data, net, vol, meta, dev)):
                    feats.append(f)
                    who.append(cid)
                    which.append(_label(m))
        if task == "transfer":
            written, summary = _transfer_tables(rows, meta, args, stage, info)
        else:
            written, summary = _seg_tables(rows, meta, regions, args, stage, info)
        if len(feats) >= 2:
            figure_embedding(stage / "figures" / "embedding.png", torch.stack(feats), which, who)
        per_case = {cid: [{k: v for k, v in r.items() if k != "case"} for r in rows if r["case"] == cid] for cid in ids}
        _write_json(stage / "results.json", {"meta": info, "summary": summary, "cases": per_case})
        texts = [(title, Path(str(stem) + ".md").read_text()) for title, stem in written]
        _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for title, text in texts:
        print(f"\n{title}\n\n{text}", end="")
    sys.stdout.flush()
    print(f"\nevaluated {len(ids)} {args.split} case(s) on {dev}: tables, results.json"
          f"{', nifti/' if args.save_nifti else ''}{', figures/' if args.figures else ''} in {out}"
          f"{'' if personalized or not args.figures else ' (no embedding figure: the network has no personalization)'}",
          file=sys.stderr)
    return {"out": out, "tables": {stem.name: out / stem.name for _, stem in written}, "results": out / "results.json",
            "summary": summary, "rows": rows}


if __name__ == "__main__":
    main()
