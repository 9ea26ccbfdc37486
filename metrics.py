"""Metrics: every number the project reports, on torch tensors or numpy arrays, computed where
the tensors live (CPU or GPU). Imports no project module; on CPU the distance and component
metrics use scipy (k-d tree, assignment) and connected-components-3d. scikit-image, MONAI and
panoptica / brats-evaluation are the tests' references, never imported here.

    image similarity  psnr, nmse, ssim3d (3-D SSIM with scikit-image's defaults)
    transfer          transfer_metrics(protocol="reference" | "strict" | "percentile", kind per
                      modality: modality_kind), transfer_case
                      (all targets of one source, with the identity baseline)
    overlap, distance dice, confusion_rates, hd95; EMPTY_POLICIES "brats", "monai", "autopet":
                      summaries name the policy and count the empty cases (tools disagree on them)
    lesion-wise       lesion_metrics (the BraTS 2024-2025 evaluation's rules: lesions matched
                      one-to-one, lesion-wise and global Dice / HD95)
    labels            LABELS (every label convention: its values and its regions), brats_regions
    regions           region_metrics (Dice / HD95 of named regions), brats_seg_metrics, seg_case,
                      brats_summary
    AutoPET           connected_components (6/18/26-connectivity), autopet_case_metrics,
                      autopet_summary
    summaries         nanmean, std (NaN values left out)
    representations   person_identification (is the nearest feature of another modality the
                      same person's? raw or centred), variance_decomposition (between-person,
                      modality and residual fractions), representation_summary (both, flat),
                      attention_entropy (of a softmax, against its maximum)

Volumes are (D, H, W) = (x, y, z) in RAS order as data.py produces them.
"""
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from einops import rearrange

# Label conventions: kind -> (the label values a file may hold, regions: name -> the label values
# inside it, in the channel order of the networks' outputs). brats: BraTS 2018-2021 (ET = 4);
# brats2023: BraTS 2023 GLI (ET = 3); autopet: lesion = 1.
LABELS = {
    "brats": ((0, 1, 2, 4), {"tc": (1, 4), "wt": (1, 2, 4), "et": (4,)}),
    "brats2023": ((0, 1, 2, 3), {"tc": (1, 3), "wt": (1, 2, 3), "et": (3,)}),
    # BraTS 2024 adult glioma, post-treatment: the 2023 labels and 4 = resection cavity, kept out
    # of the tumour regions as the official evaluation groups them
    "brats2024": ((0, 1, 2, 3, 4), {"tc": (1, 3), "wt": (1, 2, 3), "et": (3,), "rc": (4,)}),
    "autopet": ((0, 1), {"lesion": (1,)}),
}
REGIONS = ("WT", "TC", "ET")  # BraTS regions in the order tables report them


def as_tensor(x, name="input"):
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
    p, g = as_tensor(pred, f"{what} pred"), as_tensor(gt, f"{what} gt")
    if p.shape != g.shape:
        raise ValueError(f"{what}: pred shape {tuple(p.shape)} != gt shape {tuple(g.shape)}")
    return p, g.to(p.device)


def _mask(x, name):
    """Boolean mask from a bool tensor/array or one holding only 0 and 1."""
    m = as_tensor(x, name)
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
    other threads."""
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
    unit column stride: one reduction over an overlapping (C, w, m) view of x (one op instead
    of partial sums of 1, 2, 4 terms). The tail of out is left as it was. Returns the written
    part of out."""
    m = x.shape[1] - (w - 1) * step
    windows = x.as_strided((x.shape[0], w, m), (x.stride(0), step, 1))
    return torch.sum(windows, 1, out=out[:, :m])


_SSIM_REFRESH = 32  # CPU: the running depth sum is recomputed from its w slices this often


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


def ssim3d(pred, gt, data_range, win_size=7, mask=None, dtype=torch.float32, stream=True):
    """Mean 3-D SSIM with scikit-image's `structural_similarity` defaults: uniform win_size^3
    window, sample covariance, K1 = 0.01, K2 = 0.03, averaged over the voxels at least
    (win_size - 1) // 2 from the border (or over the mask voxels among them).

    Box sums are separable and run over flat arrays: a shift by 1, W or H*W along the flattened
    volume sums along w, h or d, and the sums that wrap across a row or slice fall in the
    cropped border. On CPU the depth is split in one slab per torch thread, each streamed slice
    by slice (see _ssim_slab) and each run by single-threaded ops (on a busy machine the thread
    pool's per-op barriers stall). stream=False runs the GPU's whole-slab path on CPU too.
    Accuracy: the images are scaled by 1/data_range and the box sums run on x + y and x - y
    minus their global means, so float32 sums stay small; the mean offset is added back
    exactly. Relative to float64 the mean moves below 1e-5 on the tests' worst cases
    (`python bench.py metrics` reports it on a brain-sized pair); dtype=torch.float64 is the
    exact path."""
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
    if p.is_cuda or not stream:
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


PROTOCOLS = ("reference", "strict", "percentile")


def modality_kind(name):
    """How a modality's truth is normalised (data.py): "ct" ([-1000, 1000] HU -> [-1, 1]), "pet"
    (SUV / 10) or "mri" (z-scores over the voxels it is nonzero in)."""
    return name if name in ("ct", "pet") else "mri"


def transfer_metrics(pred, gt, fg, protocol="reference", tumour=None, ssim_dtype=torch.float32, kind="mri"):
    """PSNR, NMSE and 3-D SSIM of one generated modality (D, H, W) against its ground truth, both
    in the data layer's normalised unit. kind (modality_kind): what that unit is; a prediction
    equal to the truth scores PSNR inf (MRI under "reference": above 250 dB, the z-scoring is
    recomputed), NMSE 0 and SSIM 1 in every protocol for every kind.

    reference  the paper's numbers: an MRI prediction is z-scored over the voxels the data layer
               normalised the truth over (foreground voxels where the truth is nonzero), since
               MRI has no absolute unit; CT and PET predictions are kept in their unit (the truth
               is not z-scored either). Background voxels are replaced by the truth,
               data_range = max(ptp(pred), ptp(gt)); metrics over the whole volume.
    strict     the raw prediction, no pasting; PSNR and NMSE over foreground voxels, SSIM map
               averaged over foreground voxels, data_range from the foreground.
    percentile each image clipped to its own 0.5-99.5 percentiles over the whole volume and
               scaled to [0, 1]; PSNR (range 1), NMSE and SSIM over the volume, plus SSIM inside
               the tumour (both images multiplied by the tumour mask, map averaged over it) and
               outside. Modelled on the BraSyn evaluation but not that computation (BraSyn reads
               raw MR intensities, raises a negative lower percentile to 0 and uses a Gaussian
               window; every protocol here shares the 7^3 window), so its numbers are not
               BraSyn leaderboard numbers.
    Returns a dict with the metrics, the protocol, the kind and the data range used."""
    p, g = _pair(pred, gt, "transfer_metrics")
    if p.ndim != 3:
        raise ValueError(f"transfer_metrics: expected (D, H, W) volumes, got shape {tuple(p.shape)}")
    if kind not in ("mri", "ct", "pet"):
        raise ValueError(f"transfer_metrics: kind must be 'mri', 'ct' or 'pet', got {kind!r}")
    out = {"protocol": protocol, "kind": kind}
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
            if kind == "mri":
                z = m & (g != 0)
                v = p[z if bool(z.any()) else m]
                sd = v.std(unbiased=False).item()
                if sd == 0:
                    raise ValueError("transfer_metrics: the prediction is constant over the foreground; "
                                     "cannot z-score it")
                p = (p - v.mean()) / sd
            p = torch.where(m, p, g)
            rng = max(_ptp(p), _ptp(g))
            out.update(psnr=psnr(p, g, rng), nmse=nmse(p, g), ssim=ssim3d(p, g, rng, dtype=ssim_dtype))
        else:
            pv, gv = p[m], g[m]
            rng = max(_ptp(pv), _ptp(gv))
            if rng == 0:
                raise ValueError("transfer_metrics: prediction and truth are constant over the foreground")
            out.update(psnr=psnr(pv, gv, rng), nmse=nmse(pv, gv), ssim=ssim3d(p, g, rng, mask=m, dtype=ssim_dtype))
        out["data_range"] = rng
    elif protocol == "percentile":
        p, g = _clip_scale(p, "the prediction"), _clip_scale(g, "the ground truth")
        out.update(psnr=psnr(p, g, 1.0), nmse=nmse(p, g), ssim=ssim3d(p, g, 1.0, dtype=ssim_dtype), data_range=1.0)
        out["ssim_tumour"] = out["ssim_non_tumour"] = math.nan
        if tumour is not None:
            t = as_tensor(tumour, "transfer_metrics tumour").to(p.device) != 0
            if t.shape != p.shape:
                raise ValueError(f"transfer_metrics: tumour shape {tuple(t.shape)} != volume shape {tuple(p.shape)}")
            if bool(t.any()):
                out["ssim_tumour"] = ssim3d(p * t, g * t, 1.0, mask=t, dtype=ssim_dtype)
            if not bool(t.all()):
                out["ssim_non_tumour"] = ssim3d(p * ~t, g * ~t, 1.0, mask=~t, dtype=ssim_dtype)
    else:
        raise ValueError(f"transfer_metrics: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return out


def transfer_case(case, source, preds, truths, fg, names, protocol="reference", tumour=None, identity=None,
                  ssim_dtype=torch.float32):
    """transfer_metrics for every generated target of one case and source: preds and truths are
    (T, D, H, W) (or lists), names the T target modalities, protocol one name or several.
    identity: the source volume; each row then also holds identity_psnr / _nmse / _ssim, the
    baseline of copying the input. Returns one dict per target and protocol (targets outer) with
    case, source, target and the metrics, the rows transfer_*_table expect."""
    if not (len(preds) == len(truths) == len(names)):
        raise ValueError(f"transfer_case {case}: {len(preds)} predictions, {len(truths)} truths, {len(names)} names")
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    rows = []
    for p, g, t in zip(preds, truths, names):
        for prot in protocols:
            m = transfer_metrics(p, g, fg, prot, tumour, ssim_dtype, modality_kind(t))
            if identity is not None:
                base = transfer_metrics(identity, g, fg, prot, tumour, ssim_dtype, modality_kind(t))
                m.update({f"identity_{k}": base[k] for k in ("psnr", "nmse", "ssim")})
            rows.append({"case": case, "source": source, "target": t, **m})
    return rows


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
    p, g = _mask(pred, "dice pred"), _mask(gt, "dice gt").to(as_tensor(pred).device)
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
    p, g = _mask(pred, "confusion pred"), _mask(gt, "confusion gt").to(as_tensor(pred).device)
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
    `percentile`-th percentiles of exact Euclidean surface-to-surface distances (nearest points
    from a k-d tree on CPU, from _nearest's cell search on GPU)."""
    p, g = _mask(pred, "hd95 pred"), _mask(gt, "hd95 gt").to(as_tensor(pred).device)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"hd95: expected two (D, H, W) masks of one shape, "
                         f"got {tuple(p.shape)} and {tuple(g.shape)}")
    s = _spacing(spacing, "hd95")
    _, pol = _policy(empty)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any or not g_any:
        return _empty_case(p_any, g_any, pol, "hd")
    d_pg, d_gp = _surface_distances(p, g, s)
    return max(_quantile(d_pg, percentile / 100.0), _quantile(d_gp, percentile / 100.0))


def _surface_distances(p, g, spacing):
    """Distances (mm, float64) from each surface voxel of p to the nearest of g's, and back (both
    masks non-empty): a k-d tree over the surface points on CPU (scipy; MONAI's CPU method too),
    _nearest on GPU. Both surfaces lie in the bounding box of the union, so they are found there."""
    nz = torch.nonzero(p | g)
    box = tuple(slice(a, b) for a, b in zip(nz.min(0).values.tolist(), (nz.max(0).values + 1).tolist()))
    p, g = p[box], g[box]
    scale = torch.tensor(spacing, dtype=torch.float64, device=p.device)
    ep = torch.nonzero(_edges(p)).double() * scale
    eg = torch.nonzero(_edges(g)).double() * scale
    if p.device.type == "cpu":
        from scipy.spatial import cKDTree
        a, b = ep.numpy(), eg.numpy()
        return tuple(torch.from_numpy(cKDTree(y, leafsize=32).query(x, k=1)[0]) for x, y in ((a, b), (b, a)))
    return _nearest(ep, eg), _nearest(eg, ep)


def _pooled_hd95(p, g, spacing):
    """HD95 as the BraTS 2024-2025 evaluation (panoptica) computes it: the 95th percentile of
    both directions' surface distances pooled; inf when one mask is empty."""
    if not bool(p.any()) or not bool(g.any()):
        return math.inf
    return _quantile(torch.cat(_surface_distances(p, g, spacing)), 0.95)


def lesion_metrics(pred, gt, spacing=None, connectivity=26):
    """Lesion-wise numbers of one region (binary masks (D, H, W)) by the rules of the official
    BraTS 2024-2025 evaluation (brats-evaluation's bundled configs, run by panoptica): lesions
    are the 26-connected components of each mask; a predicted and a true lesion that overlap are
    matched one-to-one by the assignment of largest total Dice (no volume threshold). Returns
    n_ref, n_pred, tp, fp, fn; f1 = tp / (tp + (fp + fn) / 2); dice and hd95, the means over
    matched pairs (HD95 of a pair: the 95th percentile of both directions' surface distances
    pooled), with no matched pair 0 and inf when either mask has lesions and NaN when neither
    has; global_dice and global_hd95 of the whole masks, 0 and inf when they do not overlap (NaN
    when both are empty). panoptica computes the global HD95 in voxels whatever the spacing (the
    lesion-wise one in mm); here both are in mm, so the two agree at 1 mm spacing."""
    p, g = _mask(pred, "lesion_metrics pred"), _mask(gt, "lesion_metrics gt").to(as_tensor(pred).device)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"lesion_metrics: expected two (D, H, W) masks of one shape, "
                         f"got {tuple(p.shape)} and {tuple(g.shape)}")
    s = _spacing(spacing, "lesion_metrics")
    lp, n_pred = connected_components(p, connectivity)
    lg, n_ref = connected_components(g, connectivity)
    out = {"n_ref": n_ref, "n_pred": n_pred}
    both = p & g
    if n_ref and n_pred and bool(both.any()):
        sizes_p = torch.bincount(lp[p], minlength=n_pred + 1).double()
        sizes_g = torch.bincount(lg[g], minlength=n_ref + 1).double()
        inter = torch.bincount(lg[both] * (n_pred + 1) + lp[both], minlength=(n_ref + 1) * (n_pred + 1))
        inter = inter.view(n_ref + 1, n_pred + 1)[1:, 1:].double()
        dsc = 2 * inter / (sizes_g[1:, None] + sizes_p[None, 1:])
        from scipy.optimize import linear_sum_assignment
        rows, cols = linear_sum_assignment((1.0 - dsc).cpu().numpy())
        pairs = [(int(i), int(j)) for i, j in zip(rows, cols) if dsc[i, j] > 0]
    else:
        pairs = []
    tp = len(pairs)
    out.update(tp=tp, fp=n_pred - tp, fn=n_ref - tp)
    out["f1"] = tp / (tp + 0.5 * (n_pred - tp) + 0.5 * (n_ref - tp)) if n_ref or n_pred else math.nan
    unmatched = (0.0, math.inf) if n_ref or n_pred else (math.nan, math.nan)  # Dice, HD95
    if pairs:
        out["dice"] = float(np.mean([dsc[i, j].item() for i, j in pairs]))
        out["hd95"] = float(np.mean([_pooled_hd95(lp == j + 1, lg == i + 1, s) for i, j in pairs]))
    else:
        out["dice"], out["hd95"] = unmatched
    if not bool(both.any()):  # no overlap: the values of an unmatched case
        out["global_dice"], out["global_hd95"] = unmatched
    else:
        out["global_dice"] = 2 * int(both.sum()) / (int(p.sum()) + int(g.sum()))
        out["global_hd95"] = _pooled_hd95(p, g, s)
    return out


# ---------------------------------------------------------------------------------------------
# BraTS regions

def brats_regions(label, convention="brats"):
    """Label map (D, H, W) -> {"WT", "TC", "ET"} boolean masks. convention "brats" (labels
    0, 1, 2, 4), "brats2023" (0, 1, 2, 3), "brats2024" (0-4, 4 the resection cavity, in no
    tumour region) or "auto" (decided by whether 3 or 4 occurs; never brats2024).
    Any other label value is an error, so a wrong convention cannot silently zero ET."""
    lab = as_tensor(label, "brats_regions label")
    values = set(torch.unique(lab).tolist())
    if convention == "auto":
        if {3, 4} <= values:
            raise ValueError("brats_regions: labels 3 and 4 both occur; cannot tell the BraTS convention")
        convention = "brats2023" if 3 in values else "brats"
    if convention not in ("brats", "brats2023", "brats2024"):
        raise ValueError(f"brats_regions: convention must be 'brats', 'brats2023', 'brats2024' or 'auto', "
                         f"got {convention!r}")
    values_of, regions = LABELS[convention]
    allowed = set(values_of)
    if not values <= allowed:
        raise ValueError(f"brats_regions: label values {sorted(values - allowed)} are not in the {convention} "
                         f"convention {sorted(allowed)}")
    return {k: torch.isin(lab, torch.tensor(regions[k.lower()], dtype=lab.dtype, device=lab.device))
            for k in REGIONS}


def _regions(x, name):
    """{"WT", "TC", "ET"} masks from a dict (any key case) or a (3, D, H, W) array in REGIONS order."""
    if isinstance(x, dict):
        d = {str(k).upper(): v for k, v in x.items()}
        if set(d) != set(REGIONS):
            raise ValueError(f"brats_seg_metrics: {name} must have the regions {REGIONS}, got {sorted(d)}")
        return d
    t = as_tensor(x, name)
    if t.ndim != 4 or t.shape[0] != 3:
        raise ValueError(f"brats_seg_metrics: {name} must be a dict or a (3, D, H, W) array in {REGIONS} order, "
                         f"got shape {tuple(t.shape)}")
    return dict(zip(REGIONS, t))


def region_metrics(pred_regions, gt_regions, policy="brats", spacing=None, hd=False):
    """Dice (and HD95 when hd=True) of each named region of one case: pred_regions and
    gt_regions are dicts name -> mask with the same names. Returns {name: Dice, ["HD95_name"],
    "empty_truth", "empty_pred" (names, in the order of gt_regions), "policy"}."""
    name, _ = _policy(policy)
    if set(pred_regions) != set(gt_regions):
        raise ValueError(f"region_metrics: predicted regions {sorted(pred_regions)} != true regions "
                         f"{sorted(gt_regions)}")
    out = {"policy": name, "empty_truth": [], "empty_pred": []}
    for k in gt_regions:
        p, g = _mask(pred_regions[k], f"pred {k}"), _mask(gt_regions[k], f"truth {k}")
        out[k] = dice(p, g, policy)
        if hd:
            out[f"HD95_{k}"] = hd95(p, g, spacing, policy)
        if not bool(g.any()):
            out["empty_truth"].append(k)
        if not bool(p.any()):
            out["empty_pred"].append(k)
    return out


def brats_seg_metrics(pred_regions, gt_regions, policy="brats", spacing=None, hd=False):
    """region_metrics of the BraTS regions of one case. Regions come as dicts from brats_regions
    (any key case) or as (3, D, H, W) arrays in WT, TC, ET order (model outputs in data.py's
    tc, wt, et channel order: pass dict(zip(("TC", "WT", "ET"), masks))).
    Returns {"WT", "TC", "ET", ["HD95_WT", ...], "empty_truth", "empty_pred", "policy"}."""
    pr, gr = _regions(pred_regions, "pred_regions"), _regions(gt_regions, "gt_regions")
    return region_metrics({k: pr[k] for k in REGIONS}, {k: gr[k] for k in REGIONS}, policy, spacing, hd)


def seg_case(case, pred_regions, gt_regions, subset=None, policy="brats", spacing=None, hd=False):
    """The scores of one case tagged with its id and the subset of available modalities (a
    tuple of names), the rows brats_summary and missing_modality_table expect: BraTS regions
    (arrays, or dicts of WT / TC / ET in any key case) by brats_seg_metrics, dicts of other
    regions (an AutoPET lesion) by region_metrics."""
    brats = not isinstance(gt_regions, dict) or {str(k).upper() for k in gt_regions} == set(REGIONS)
    score = brats_seg_metrics if brats else region_metrics
    out = {"case": case, **score(pred_regions, gt_regions, policy, spacing, hd)}
    if subset is not None:
        out["subset"] = tuple(subset)
    return out


HD_PENALTY = 373.0  # mm, the official BraTS parser's value for an infinite HD95 (the SRI atlas diagonal)


def lesion_summary(cases):
    """Means over cases of lesion_metrics results ({region: lesion_metrics(...)} per case): F1,
    lesion-wise and global Dice and HD95, NaN values left out and an infinite HD95 counted as
    HD_PENALTY mm (the official BraTS parser's penalty); with the lesion counts summed and the
    number of cases."""
    if not cases:
        raise ValueError("lesion_summary: no cases")
    finite = lambda v: HD_PENALTY if v == math.inf else v
    out = {}
    for region in cases[0]:
        rows = [c[region] for c in cases]
        out[region] = {k: nanmean(finite(r[k]) if "hd95" in k else r[k] for r in rows)
                       for k in ("f1", "dice", "hd95", "global_dice", "global_hd95")}
        out[region].update({k: sum(r[k] for r in rows) for k in ("n_ref", "n_pred", "tp", "fp", "fn")})
        out[region]["cases"] = len(rows)
    return out


def nanmean(values):
    """Mean of the values that are not NaN (NaN when there are none)."""
    v = [float(x) for x in values if not math.isnan(float(x))]
    return sum(v) / len(v) if v else math.nan


def std(values):
    """Sample standard deviation of the values that are not NaN."""
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
                out[key] = nanmean(vals)
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
    """Labels (D, H, W) int64, 0 = background, components numbered 1..n in raster order of their
    first voxel (scipy.ndimage.label's numbering), and n. On CPU connected-components-3d (the
    library the autoPET evaluation uses); on GPU union-find on the voxel graph in torch: every
    round hooks the larger of two linked roots onto the smaller, then pointer jumping flattens
    the trees (numbered in the order of their smallest voxel)."""
    m = _mask(mask, "connected_components mask")
    if m.ndim != 3:
        raise ValueError(f"connected_components: expected a (D, H, W) mask, got shape {tuple(m.shape)}")
    _neighbour_offsets(connectivity)  # checks the connectivity
    if m.device.type == "cpu":
        import cc3d
        labels, n = cc3d.connected_components(m.numpy(), connectivity=connectivity, return_N=True)
        return torch.from_numpy(labels.astype(np.int64, copy=False)), int(n)
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
    p, g = _mask(pred, "autopet pred"), _mask(gt, "autopet gt").to(as_tensor(pred).device)
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
        dice=nanmean(c["dice"] for c in cases),
        dice_minus=nanmean(c["dice"] for c in cases if c["gt_positive"]),
        tpr=rates["tpr"], tnr=rates["tnr"], fnr=rates["fnr"], fpr=rates["fpr"],
        fp_volume_ml=nanmean(c["fp_volume_ml"] for c in cases),
        fn_volume_ml=nanmean(c["fn_volume_ml"] for c in cases),
        n=len(cases), n_positive=int(gt.sum()), n_negative=int((~gt).sum()),
        n_true_negative=rates["tn"], policy="autopet")


# ---- representations -------------------------------------------------------------------------


def person_identification(feats, names=None, centre=False):
    """Person identification from features (P persons, M modalities, d), by cosine similarity.

    For each ordered pair of modalities (i, j), i != j, and each person p: is the feature of
    modality j nearest (highest cosine over the P persons) to p's feature of modality i p's own?
    Returns accuracy per pair ("i>j", names or indices), their mean "accuracy", "chance" = 1 / P,
    and the mean cosine between two modalities of the same person ("cos_same") and of two
    different persons ("cos_other"). Ties count as misses. centre=True first subtracts the grand
    mean over persons and modalities: a shared offset dominates the cosine of raw vectors (two
    persons who differ by a little around a large common vector have cosine ~1), and its removal
    leaves what tells persons and modalities apart."""
    f = _feature_table(feats, "person_identification")
    if centre:
        f = f - f.mean((0, 1), keepdim=True)
    n_p, n_m = f.shape[:2]
    names = [str(m) for m in (names or range(n_m))]
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    pairs, same, other = {}, [], []
    eye = torch.eye(n_p, dtype=torch.bool, device=f.device)
    for i, j in itertools.permutations(range(n_m), 2):
        cos = f[:, i] @ f[:, j].T  # (P, P): query person, candidate person
        own = cos.diagonal()
        best_other = cos.masked_fill(eye, -math.inf).max(1).values
        pairs[f"{names[i]}>{names[j]}"] = float((own > best_other).double().mean())
        same.append(own)
        other.append(cos[~eye])
    return {"pairs": pairs, "accuracy": float(np.mean(list(pairs.values()))), "chance": 1.0 / n_p,
            "cos_same": float(torch.cat(same).mean()), "cos_other": float(torch.cat(other).mean())}



def _feature_table(feats, name):
    f = as_tensor(feats, f"{name} feats").double()
    if f.ndim != 3 or f.shape[0] < 2 or f.shape[1] < 2:
        raise ValueError(f"{name}: expected (persons >= 2, modalities >= 2, d) features, got shape {tuple(f.shape)}")
    return f


def variance_decomposition(feats):
    """The spread of features (P persons, M modalities, d) around their grand mean, split in the
    two-way layout persons x modalities (sums of squares, each a fraction of the total):
      between   the person means around the grand mean (what a personal representation has),
      within    everything else: a person's modalities around the person's mean, = modality + residual,
      modality  the modality means around the grand mean (what a modality-specific one has),
      residual  the person x modality interaction and noise.
    between + within = 1 (and every fraction 0 when the features do not vary at all).
    "offset" is the grand mean's share of the features' raw second moment, ||mean||^2 /
    (||mean||^2 + total / (P M)): near 1, raw cosines are ~1 whatever the persons.
    "between_dims" is the number of directions the person means spread along, the participation
    ratio (sum l)^2 / sum l^2 of the eigenvalues l of their scatter: 1 when persons differ along
    one line, P - 1 when they are equally far apart in every direction they span; a large
    between-person fraction on few directions crowds persons together (0 without spread)."""
    f = _feature_table(feats, "variance_decomposition")
    n_p, n_m = f.shape[:2]
    grand = f.mean((0, 1))
    total = float(((f - grand) ** 2).sum())
    persons = f.mean(1) - grand
    between = float(n_m * (persons ** 2).sum())
    modality = float(n_p * ((f.mean(0) - grand) ** 2).sum())
    mean_sq = float((grand ** 2).sum())
    offset = mean_sq / (mean_sq + total / (n_p * n_m)) if mean_sq + total > 0 else 0.0
    # relative to the features' size: a total at rounding level is no spread at all
    if total <= 1e-12 * max(mean_sq * n_p * n_m, 1e-300):
        return {"between": 0.0, "within": 0.0, "modality": 0.0, "residual": 0.0, "offset": offset, "total": total,
                "between_dims": 0.0}
    within = total - between
    gram = persons @ persons.T  # shares the scatter's non-zero eigenvalues: trace^2 / ||gram||_F^2
    dims = float(gram.trace() ** 2 / (gram ** 2).sum()) if between > 1e-12 * total else 0.0
    return {"between": between / total, "within": within / total, "modality": modality / total,
            "residual": (within - modality) / total, "offset": offset, "total": total, "between_dims": dims}


def representation_summary(feats, names=None):
    """What tells whether features (P persons, M modalities, d) are personal, flat: the variance
    decomposition, and person identification on the raw and on the centred vectors
    ("accuracy", "cos_same", "cos_other" and the same with "_centred"), with "chance"."""
    raw, centred = person_identification(feats, names), person_identification(feats, names, centre=True)
    return {**variance_decomposition(feats), "accuracy": raw["accuracy"], "cos_same": raw["cos_same"],
            "cos_other": raw["cos_other"], "accuracy_centred": centred["accuracy"],
            "cos_same_centred": centred["cos_same"], "cos_other_centred": centred["cos_other"],
            "chance": raw["chance"]}


def attention_entropy(probs):
    """Mean entropy (nats) of the rows of softmax probabilities (..., L) and its maximum log L:
    ("entropy", "max", "ratio"). A ratio near 1 is a near-uniform softmax that selects nothing."""
    p = as_tensor(probs, "attention_entropy probs").double()
    if p.ndim < 1 or p.shape[-1] < 2:
        raise ValueError(f"attention_entropy: expected probabilities over at least 2 keys, got shape {tuple(p.shape)}")
    h = -(p * p.clamp_min(1e-300).log()).sum(-1).mean()
    top = math.log(p.shape[-1])
    return {"entropy": float(h), "max": top, "ratio": float(h) / top}
