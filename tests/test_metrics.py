"""metrics.py against independent references: scikit-image (PSNR, NRMSE, SSIM), MONAI (Dice,
confusion-matrix rates, HD95), scipy.ndimage.label (connected components) and brute-force loops
written here."""
import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (compute_confusion_matrix_metric, compute_dice, compute_hausdorff_distance,
                           get_confusion_matrix)
from scipy import ndimage
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

import metrics
import report
from conftest import smooth

RNG = np.random.default_rng(0)


def volume_pairs():
    """(name, pred, gt): random, smooth, large offset, two-level and blocky, all non-cubic."""
    rng = np.random.default_rng(1)
    g = rng.standard_normal((19, 14, 23))
    yield "random", g + 0.5 * rng.standard_normal(g.shape), g
    g = smooth((22, 17, 15))
    yield "smooth", g + 0.05 * smooth((22, 17, 15), seed=1), g
    g = 1000 + 5 * smooth((15, 24, 13), seed=2)
    yield "offset", g + 0.2 * rng.standard_normal(g.shape), g
    g = np.where(smooth((18, 18, 21), seed=3) > 0, 1.0, -1.0) + 0.001 * smooth((18, 18, 21), seed=4)
    yield "two-level", g + 0.001 * rng.standard_normal(g.shape), g
    g = np.zeros((13, 16, 20))
    g[3:10, 4:12, 5:15] = 3.0
    yield "blocky", (g * 1.01).astype(np.float32), g.astype(np.float32)


def ptp_range(p, g):
    return float(max(np.ptp(p), np.ptp(g)))


# ---------------------------------------------------------------------------------------------
# PSNR, NMSE, SSIM


@pytest.mark.parametrize("name,pred,gt", list(volume_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_psnr_nmse_ssim_match_skimage(name, pred, gt):
    rng = ptp_range(pred, gt)
    assert metrics.psnr(pred, gt, rng) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=rng), abs=1e-6)
    assert metrics.nmse(pred, gt) == pytest.approx(normalized_root_mse(gt, pred, normalization="euclidean") ** 2, rel=1e-6)
    ref = structural_similarity(pred.astype(np.float64), gt.astype(np.float64), data_range=rng)
    assert abs(metrics.ssim3d(pred, gt, rng) - ref) < 1e-5  # float32 path (default)
    assert abs(metrics.ssim3d(torch.from_numpy(pred), torch.from_numpy(gt), rng, dtype=torch.float64) - ref) < 1e-9
    ref5 = structural_similarity(pred.astype(np.float64), gt.astype(np.float64), data_range=rng, win_size=5)
    assert abs(metrics.ssim3d(pred, gt, rng, win_size=5) - ref5) < 1e-5
    # a data range much smaller than the values (luminance and contrast terms nearly unregularised)
    small = structural_similarity(pred.astype(np.float64), gt.astype(np.float64), data_range=rng / 50)
    assert abs(metrics.ssim3d(pred, gt, rng / 50) - small) < 1e-4


def test_ssim_mask_averages_the_skimage_map():
    g = smooth((20, 18, 16))
    p = g + 0.1 * RNG.standard_normal(g.shape)
    rng = ptp_range(p, g)
    _, smap = structural_similarity(p, g, data_range=rng, full=True)
    mask = np.zeros(g.shape, bool)
    mask[2:15, 5:18, 1:9] = True
    inner = (slice(3, -3),) * 3
    want = smap[inner][mask[inner]].mean()
    assert metrics.ssim3d(p, g, rng, mask=mask) == pytest.approx(want, abs=1e-6)
    assert metrics.ssim3d(p, g, rng, mask=mask, dtype=torch.float64) == pytest.approx(want, abs=1e-12)
    # the whole-volume mean is the mask of everything
    assert metrics.ssim3d(p, g, rng, mask=np.ones(g.shape, bool)) == pytest.approx(smap[inner].mean(), abs=1e-6)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole-slab"])
def test_ssim_long_volume(stream):
    # streamed (CPU): deeper than several refreshes of the running depth sum, so its drift and
    # the ring of filtered slices are exercised; whole-slab: the path the GPU takes
    g = smooth((90, 12, 10), passes=2)
    p = g + 0.2 * RNG.standard_normal(g.shape)
    rng = ptp_range(p, g)
    assert abs(metrics.ssim3d(p, g, rng, stream=stream) - structural_similarity(p, g, data_range=rng)) < 1e-6
    _, smap = structural_similarity(p, g, data_range=rng, full=True)
    mask = smooth(g.shape, seed=5) > 0
    inner = (slice(3, -3),) * 3
    assert metrics.ssim3d(p, g, rng, mask=mask, stream=stream) == pytest.approx(smap[inner][mask[inner]].mean(), abs=1e-6)


def test_ssim_bad_input():
    x = np.zeros((8, 8, 8))
    with pytest.raises(ValueError, match="win_size"):
        metrics.ssim3d(x, x, 1.0, win_size=6)
    with pytest.raises(ValueError, match="every side"):
        metrics.ssim3d(np.zeros((8, 5, 8)), np.zeros((8, 5, 8)), 1.0)
    with pytest.raises(ValueError, match="shape"):
        metrics.ssim3d(x, np.zeros((8, 8, 9)), 1.0)
    mask = np.zeros((8, 8, 8), bool)
    mask[0] = True  # only border voxels, none in the valid region
    with pytest.raises(ValueError, match="mask has no voxel"):
        metrics.ssim3d(x, x + 1, 1.0, mask=mask)
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(x, x, 0)
    with pytest.raises(ValueError, match="all zero"):
        metrics.nmse(x + 1, x)


def _crop_mean(smap, mask):
    inner = (slice(3, -3),) * 3
    return smap[inner][mask[inner]].mean()


def test_transfer_protocols_match_a_direct_computation():
    rng = np.random.default_rng(3)
    shape = (24, 26, 20)
    fg = np.zeros(shape, bool)
    fg[3:21, 4:23, 2:18] = True
    gt = np.where(fg, smooth(shape, seed=5) * 8, 0.0)
    gt[fg] = (gt[fg] - gt[fg].mean()) / gt[fg].std()  # z-scored over the brain, as data.py does
    pred = 1.7 * gt + 0.4 + 0.2 * rng.standard_normal(shape)
    tumour = np.zeros(shape, bool)
    tumour[9:16, 10:17, 7:13] = True

    out = metrics.transfer_metrics(pred, gt, fg, "reference")
    z = np.where(fg, (pred - pred[fg].mean()) / pred[fg].std(), gt)
    r = ptp_range(z, gt)
    assert out["data_range"] == pytest.approx(r)
    assert out["psnr"] == pytest.approx(peak_signal_noise_ratio(gt, z, data_range=r), abs=1e-6)
    assert out["nmse"] == pytest.approx(((z - gt) ** 2).sum() / (gt ** 2).sum(), rel=1e-9)
    assert out["ssim"] == pytest.approx(structural_similarity(z, gt, data_range=r), abs=1e-5)

    out = metrics.transfer_metrics(pred, gt, fg, "strict")
    r = ptp_range(pred[fg], gt[fg])
    assert out["psnr"] == pytest.approx(peak_signal_noise_ratio(gt[fg], pred[fg], data_range=r), abs=1e-6)
    assert out["nmse"] == pytest.approx(((pred - gt)[fg] ** 2).sum() / (gt[fg] ** 2).sum(), rel=1e-9)
    _, smap = structural_similarity(pred, gt, data_range=r, full=True)
    assert out["ssim"] == pytest.approx(_crop_mean(smap, fg), abs=1e-5)

    out = metrics.transfer_metrics(pred, gt, None, "percentile", tumour=tumour)

    def clip_scale(a):
        lo, hi = np.percentile(a, [0.5, 99.5])
        return (np.clip(a, lo, hi) - lo) / (hi - lo)
    p1, g1 = clip_scale(pred), clip_scale(gt)
    assert out["psnr"] == pytest.approx(peak_signal_noise_ratio(g1, p1, data_range=1.0), abs=1e-6)
    assert out["ssim"] == pytest.approx(structural_similarity(p1, g1, data_range=1.0), abs=1e-5)
    _, smap = structural_similarity(p1 * tumour, g1 * tumour, data_range=1.0, full=True)
    assert out["ssim_tumour"] == pytest.approx(_crop_mean(smap, tumour), abs=1e-5)
    _, smap = structural_similarity(p1 * ~tumour, g1 * ~tumour, data_range=1.0, full=True)
    assert out["ssim_non_tumour"] == pytest.approx(_crop_mean(smap, ~tumour), abs=1e-5)

    rows = metrics.transfer_case("c0", "t1", [pred, gt], [gt, gt], fg, ["t2", "flair"])
    assert [(r["case"], r["source"], r["target"]) for r in rows] == [("c0", "t1", "t2"), ("c0", "t1", "flair")]
    assert rows[0]["ssim"] == metrics.transfer_metrics(pred, gt, fg)["ssim"]
    with pytest.raises(ValueError, match="protocol"):
        metrics.transfer_metrics(pred, gt, fg, "paper")
    with pytest.raises(ValueError, match="constant"):
        metrics.transfer_metrics(np.ones(shape), gt, fg, "reference")


# ---------------------------------------------------------------------------------------------
# Dice, confusion rates, HD95 against MONAI, empty cases included


def mask_pairs():
    """(pred, gt) boolean masks: random blobs with speckle, plus the four empty combinations."""
    rng = np.random.default_rng(7)
    shape = (15, 18, 12)
    grid = np.indices(shape)

    def blob():
        c, r = rng.uniform(3, 11, 3), rng.uniform(1.5, 5, 3)
        return sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1
    pairs = [(blob() | (rng.random(shape) > 0.98), blob()) for _ in range(5)]
    pairs.append((rng.random(shape) > 0.7, rng.random(shape) > 0.6))
    z = np.zeros(shape, bool)
    one = z.copy()
    one[3:6, 4:9, 2:5] = True
    pairs += [(z, z), (one, z), (z, one), (one, one)]
    return pairs


def as_monai(m):
    return torch.from_numpy(m)[None, None].float()


def same(a, b, tol):
    return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= tol


def test_dice_and_confusion_rates_match_monai():
    for p, g in mask_pairs():
        monai_nan = compute_dice(as_monai(p), as_monai(g), include_background=True, ignore_empty=True).item()
        monai_one = compute_dice(as_monai(p), as_monai(g), include_background=True, ignore_empty=False).item()
        assert same(metrics.dice(p, g, "monai"), monai_nan, 1e-6)
        assert same(metrics.dice(p, g, "brats"), monai_one, 1e-6)  # BraTS: both empty -> 1, one empty -> 0
        # AutoPET: a true negative is left out (NaN), a false positive on a negative case scores 0
        if not g.any():
            want = 0.0 if p.any() else np.nan
        else:
            want = 2 * (p & g).sum() / (p.sum() + g.sum())
        assert same(metrics.dice(torch.from_numpy(p), torch.from_numpy(g), "autopet"), want, 1e-12)
        cm = get_confusion_matrix(as_monai(p), as_monai(g), include_background=True)
        ours = metrics.confusion_rates(p, g)
        for k in ("tpr", "tnr", "fpr", "fnr"):
            assert same(ours[k], compute_confusion_matrix_metric(k, cm).item(), 1e-6), k
        assert [ours[k] for k in ("tp", "fp", "tn", "fn")] == cm[0, 0].long().tolist()


def test_hd95_matches_monai_including_empty_masks():
    rng = np.random.default_rng(11)
    warnings.simplefilter("ignore")  # MONAI warns on empty masks
    for p, g in mask_pairs():
        spacing = rng.uniform(0.6, 2.0, 3)
        ref = compute_hausdorff_distance(as_monai(p), as_monai(g), include_background=True, percentile=95,
                                         spacing=spacing.tolist()).item()
        ours = metrics.hd95(p, g, spacing, empty="monai")
        assert same(ours, ref, 1e-4 * max(1.0, ref)), (ours, ref)  # MONAI keeps float32 distances
        brats = metrics.hd95(p, g, spacing, empty="brats")
        if p.any() and g.any():
            assert brats == ours
        else:
            assert brats == (0.0 if not (p.any() or g.any()) else 373.13)
    # surfaces spanning many search cells, plus scattered false positives far from them
    grid = np.indices((46, 40, 42))
    ell = lambda c, r: sum(((x - ci) / ri) ** 2 for x, ci, ri in zip(grid, c, r)) <= 1
    g = ell((23, 20, 21), (20, 17, 18))
    p = ell((24, 21, 20), (18, 18, 17)) | (rng.random(g.shape) > 0.9993)
    ref = compute_hausdorff_distance(as_monai(p), as_monai(g), include_background=True, percentile=95,
                                     spacing=[1.2, 1.4, 1.3]).item()
    assert metrics.hd95(p, g, (1.2, 1.4, 1.3)) == pytest.approx(ref, rel=1e-5)
    # the directed maximum (percentile 100) equals a brute force over surface voxels
    p, g = mask_pairs()[0]
    pts = lambda m: np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0)) * np.array([1.0, 2.0, 0.5])
    a, b = pts(p), pts(g)
    d = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    want = max(d.min(1).max(), d.min(0).max())
    assert metrics.hd95(p, g, (1.0, 2.0, 0.5), percentile=100) == pytest.approx(want, abs=1e-9)


def test_policies_and_brats_regions():
    label = np.zeros((10, 11, 12), np.uint8)
    label[2:8, 2:9, 3:9] = 2
    label[3:6, 3:7, 4:7] = 1
    label[4:5, 4:6, 5:6] = 4
    regions = metrics.brats_regions(label)
    for name, values in (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))):
        assert np.array_equal(regions[name].numpy(), np.isin(label, values))
    label23 = np.where(label == 4, 3, label)
    for name in metrics.REGIONS:
        assert torch.equal(metrics.brats_regions(label23, "brats2023")[name], regions[name])
        assert torch.equal(metrics.brats_regions(label23, "auto")[name], regions[name])
    big_endian = label.astype(">i2")  # as nibabel may hand them over
    assert torch.equal(metrics.brats_regions(big_endian)["ET"], regions["ET"])
    with pytest.raises(ValueError, match=r"\[4\] are not in the brats2023"):
        metrics.brats_regions(label, "brats2023")
    with pytest.raises(ValueError, match="3 and 4 both"):
        metrics.brats_regions(np.array([[[3, 4]]]), "auto")

    # a case with no enhancing tumour in truth or prediction, and one where only the truth has it
    no_et = {k: v.clone() for k, v in regions.items()}
    no_et["ET"][:] = False
    both_empty = metrics.seg_case("a", no_et, no_et, subset=("t1",), policy="brats", hd=True)
    assert both_empty["ET"] == 1.0 and both_empty["HD95_ET"] == 0.0 and both_empty["empty_truth"] == ["ET"]
    missed = metrics.brats_seg_metrics(no_et, regions, policy="brats", hd=True)
    assert missed["ET"] == 0.0 and missed["HD95_ET"] == 373.13 and missed["WT"] == 1.0
    s = metrics.brats_summary([both_empty, {"case": "b", **missed}])
    assert s["policy"] == "brats" and s["ET"] == 0.5 and s["n_empty_truth_ET"] == 1 and s["n_empty_pred_ET"] == 2
    monai = [metrics.brats_seg_metrics(no_et, no_et, policy="monai"), metrics.brats_seg_metrics(no_et, regions, policy="monai")]
    s = metrics.brats_summary(monai)
    assert s["policy"] == "monai" and s["ET"] == 0.0 and s["n_excluded_ET"] == 1  # the NaN case is left out
    with pytest.raises(ValueError, match="different empty policies"):
        metrics.brats_summary([both_empty, monai[0]])
    with pytest.raises(ValueError, match="unknown empty-mask policy"):
        metrics.dice(label > 0, label > 0, empty="nnunet")
    custom = dict(metrics.EMPTY_POLICIES["brats"], name="mine", dice_both_empty=0.5)
    assert metrics.dice(label > 9, label > 9, custom) == 0.5
    # arrays in WT, TC, ET order give the same result as dicts
    stack = torch.stack([regions[k] for k in metrics.REGIONS])
    assert metrics.brats_seg_metrics(stack, regions)["TC"] == 1.0


# ---------------------------------------------------------------------------------------------
# Connected components and AutoPET


@pytest.mark.parametrize("connectivity,rank", [(6, 1), (18, 2), (26, 3)])
def test_connected_components_match_scipy(connectivity, rank):
    rng = np.random.default_rng(connectivity)
    for density in (0.1, 0.3, 0.45):
        m = rng.random((14, 17, 11)) < density
        ours, n = metrics.connected_components(m, connectivity)
        ref, n_ref = ndimage.label(m, ndimage.generate_binary_structure(3, rank))
        assert n == n_ref
        pairs = set(zip(ours.numpy()[m].tolist(), ref[m].tolist()))
        assert len(pairs) == n  # the same partition of the voxels
        assert (ours.numpy()[~m] == 0).all() and set(ours.numpy()[m].tolist()) == set(range(1, n + 1))


def test_corner_neighbours_are_separate_at_18_connectivity():
    m = np.zeros((4, 4, 4), bool)
    m[1, 1, 1] = m[2, 2, 2] = True  # touch at a corner only
    assert metrics.connected_components(m, 18)[1] == 2
    assert metrics.connected_components(m, 26)[1] == 1
    m[2, 2, 2], m[2, 2, 1] = False, True  # touch along an edge
    assert metrics.connected_components(m, 18)[1] == 1
    assert metrics.connected_components(m, 6)[1] == 2


def official_style_volumes(pred, gt, connectivity_rank=2):
    """FP/FN voxel counts the way the AutoPET evaluation script loops over components."""
    def unmatched(a, b):
        lab, n = ndimage.label(a, ndimage.generate_binary_structure(3, connectivity_rank))
        return sum(int((lab == i).sum()) for i in range(1, n + 1) if not (b[lab == i]).any())
    return unmatched(pred, gt), unmatched(gt, pred)


def test_autopet_fp_fn_volumes_on_hand_built_components():
    gt = np.zeros((12, 12, 12), bool)
    pred = np.zeros_like(gt)
    for v in [(2, 2, 2), (2, 2, 3), (2, 3, 3)]:  # lesion A, found
        gt[v] = True
    gt[8, 8, 8] = gt[8, 8, 9] = True  # lesion B, missed: 2 voxels
    gt[3, 4, 4] = True  # corner-touches A only, so its own component, missed: 1 voxel
    pred[2, 2, 3] = True  # overlaps A
    pred[1, 1, 3] = True  # edge-touches the voxel above: same component, not a false positive
    pred[3, 3, 4] = True  # corner-touches it only: its own component, a false positive
    for v in [(5, 5, 5), (5, 5, 6), (5, 6, 6), (6, 6, 6)]:  # a false-positive lesion of 4 voxels
        pred[v] = True
    spacing = (2.0, 1.0, 1.5)  # 3 mm^3 per voxel
    out = metrics.autopet_case_metrics(pred, gt, spacing)
    assert out["fp_volume_ml"] == pytest.approx(5 * 3 / 1000)
    assert out["fn_volume_ml"] == pytest.approx(3 * 3 / 1000)
    assert official_style_volumes(pred, gt) == (5, 3)
    assert metrics._unmatched_volume(torch.from_numpy(pred), torch.from_numpy(gt), 26) == 4  # 26-connectivity differs
    assert out["dice"] == pytest.approx(2 * 1 / (pred.sum() + gt.sum()))
    assert out["gt_positive"] and out["pred_positive"]
    # random cases against the component loop
    rng = np.random.default_rng(5)
    for _ in range(3):
        p, g = rng.random((10, 13, 9)) < 0.08, rng.random((10, 13, 9)) < 0.08
        out = metrics.autopet_case_metrics(p, g, 1.0)
        fp, fn = official_style_volumes(p, g)
        assert (out["fp_volume_ml"], out["fn_volume_ml"]) == pytest.approx((fp / 1000, fn / 1000))


def test_autopet_summary_case_level_rates():
    rng = np.random.default_rng(9)
    shape = (8, 9, 10)
    lesion = np.zeros(shape, bool)
    lesion[2:5, 3:6, 4:7] = True
    empty = np.zeros(shape, bool)
    shifted = np.roll(lesion, 1, 0)
    speck = empty.copy()
    speck[7, 8, 9] = True
    cases = [(shifted, lesion), (empty, lesion), (empty, empty), (speck, empty), (lesion, lesion), (empty, empty)]
    results = [dict(metrics.autopet_case_metrics(p, g, (1, 1, 2)), method="m") for p, g in cases]
    s = metrics.autopet_summary(results)
    d_shift = 2 * (shifted & lesion).sum() / (2 * lesion.sum())
    assert s["dice"] == pytest.approx((d_shift + 0 + 0 + 1) / 4)  # true negatives left out, FP negative = 0
    assert s["dice_minus"] == pytest.approx((d_shift + 0 + 1) / 3)
    gt_pos = torch.tensor([g.any() for _, g in cases]).float()[None, None]
    pr_pos = torch.tensor([p.any() for p, _ in cases]).float()[None, None]
    cm = get_confusion_matrix(pr_pos, gt_pos, include_background=True)
    for k in ("tpr", "tnr", "fpr", "fnr"):
        assert s[k] == pytest.approx(compute_confusion_matrix_metric(k, cm).item(), abs=1e-6)
    assert s["n_true_negative"] == 2 and s["policy"] == "autopet"
    fp = [official_style_volumes(p, g)[0] * 2 / 1000 for p, g in cases]
    assert s["fp_volume_ml"] == pytest.approx(np.mean(fp))
    row = report.autopet_table(results)[0]
    assert row["method"] == "m" and row["Dice"] == pytest.approx(100 * s["dice"]) and row["true negatives"] == 2


def test_person_identification_against_brute_force():
    rng = np.random.default_rng(4)
    persons, mods, d = 7, 3, 10
    base = rng.standard_normal((persons, 1, d))
    feats = base + rng.standard_normal((persons, mods, d)) * np.array([0.3, 1.0, 3.0])[None, :, None]
    got = metrics.person_identification(torch.from_numpy(feats), ["a", "b", "c"])
    unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    accs, same, other = {}, [], []
    for i in range(mods):
        for j in range(mods):
            if i == j:
                continue
            hits = 0
            for p in range(persons):
                cos = [float(unit[p, i] @ unit[q, j]) for q in range(persons)]
                hits += int(np.argmax(cos) == p and sorted(cos)[-2] < cos[p])
                same.append(cos[p])
                other += [c for q, c in enumerate(cos) if q != p]
            accs["abc"[i] + ">" + "abc"[j]] = hits / persons
    assert got["pairs"].keys() == accs.keys()
    for k, v in accs.items():
        assert got["pairs"][k] == pytest.approx(v), k
    assert got["accuracy"] == pytest.approx(np.mean(list(accs.values())))
    assert got["chance"] == pytest.approx(1 / persons)
    assert got["cos_same"] == pytest.approx(np.mean(same)) and got["cos_other"] == pytest.approx(np.mean(other))
    assert 0 < min(accs.values()) < max(accs.values()) <= 1  # the noise levels make the pairs differ
    # every person identical across modalities: perfect; all persons the same vector: ties are misses
    assert metrics.person_identification(torch.from_numpy(np.repeat(base, 2, 1)))["accuracy"] == 1.0
    assert metrics.person_identification(torch.ones(4, 2, 5))["accuracy"] == 0.0
    with pytest.raises(ValueError):
        metrics.person_identification(torch.ones(1, 2, 5))


def test_variance_decomposition_against_hand_computed_cases_and_loops():
    rng = np.random.default_rng(5)
    persons, mods, d = 6, 4, 9
    offset = 50 * rng.standard_normal(d)
    a, b = rng.standard_normal((persons, 1, d)), rng.standard_normal((1, mods, d))
    # a constant representation has no spread: every fraction 0, all of it offset
    const = metrics.variance_decomposition(torch.from_numpy(np.broadcast_to(offset, (persons, mods, d)).copy()))
    assert const["between"] == const["within"] == const["modality"] == 0 and const["offset"] == pytest.approx(1)
    # a function of the person alone: within-person fraction 0, whatever the offset
    person = metrics.variance_decomposition(torch.from_numpy(offset + np.repeat(a, mods, 1)))
    assert person["between"] == pytest.approx(1) and abs(person["within"]) < 1e-12
    # a function of the modality alone: no between-person spread, all of it modality
    modality = metrics.variance_decomposition(torch.from_numpy(offset + np.repeat(b, persons, 0)))
    assert abs(modality["between"]) < 1e-12 and modality["modality"] == pytest.approx(1)
    # the general case against sums of squares in loops
    feats = offset + a + 0.5 * b + 0.3 * rng.standard_normal((persons, mods, d))
    grand = feats.reshape(-1, d).mean(0)
    total = sum(float(np.sum((feats[p, m] - grand) ** 2)) for p in range(persons) for m in range(mods))
    between = sum(mods * float(np.sum((feats[p].mean(0) - grand) ** 2)) for p in range(persons))
    mod = sum(persons * float(np.sum((feats[:, m].mean(0) - grand) ** 2)) for m in range(mods))
    got = metrics.variance_decomposition(torch.from_numpy(feats))
    assert got["total"] == pytest.approx(total) and got["between"] == pytest.approx(between / total)
    assert got["modality"] == pytest.approx(mod / total)
    assert got["residual"] == pytest.approx((total - between - mod) / total) and got["residual"] > 0
    assert got["between"] + got["within"] == pytest.approx(1)
    assert got["offset"] == pytest.approx(float(grand @ grand) / (float(grand @ grand) + total / (persons * mods)))
    # the directions the persons spread along: the participation ratio of their scatter's eigenvalues
    lam = np.linalg.eigvalsh(np.cov(feats.mean(1), rowvar=False))
    assert got["between_dims"] == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum())
    assert const["between_dims"] == 0 and modality["between_dims"] == 0


def test_between_dims_counts_the_directions_persons_differ_along():
    rng = np.random.default_rng(6)
    persons, mods, d = 5, 3, 8
    noise = 1e-3 * rng.standard_normal((persons, mods, d))
    # persons on one line, however far apart: one direction
    line = rng.standard_normal(persons)[:, None, None] * rng.standard_normal(d) + noise
    assert metrics.variance_decomposition(torch.from_numpy(line))["between_dims"] == pytest.approx(1, abs=1e-3)
    # persons at the corners of a simplex (one-hot): P - 1 equal directions
    corners = np.repeat(np.eye(persons, d)[:, None], mods, 1) + noise
    assert metrics.variance_decomposition(torch.from_numpy(corners))["between_dims"] == pytest.approx(persons - 1, rel=1e-2)
    # two groups of persons: nearly all spread between persons, on one direction
    groups = np.repeat(np.array([0, 0, 0, 1, 1], float)[:, None, None] * np.ones(d), mods, 1) + noise
    got = metrics.variance_decomposition(torch.from_numpy(groups))
    assert got["between"] > 0.99 and got["between_dims"] == pytest.approx(1, abs=1e-2)


def test_centred_identification_sees_persons_behind_a_shared_offset():
    rng = np.random.default_rng(6)
    persons, mods, d = 8, 3, 16
    offset = 100 * rng.standard_normal(d)
    feats = offset + rng.standard_normal((persons, 1, d)) + 0.3 * rng.standard_normal((persons, mods, d))
    raw = metrics.person_identification(torch.from_numpy(feats))
    centred = metrics.person_identification(torch.from_numpy(feats), centre=True)
    # the raw cosines cannot tell the persons apart, the centred ones can
    assert raw["cos_same"] > 0.999 and raw["cos_other"] > 0.999
    assert centred["accuracy"] == 1.0 and centred["cos_same"] > 0.8 and abs(centred["cos_other"]) < 0.3
    by_hand = metrics.person_identification(torch.from_numpy(feats - feats.reshape(-1, d).mean(0)))
    assert centred["pairs"] == by_hand["pairs"]
    assert all(centred[k] == pytest.approx(by_hand[k], abs=1e-12) for k in ("cos_same", "cos_other"))
    summary = metrics.representation_summary(torch.from_numpy(feats))
    assert summary["accuracy_centred"] == centred["accuracy"] and summary["cos_same"] == raw["cos_same"]
    assert summary["between"] == metrics.variance_decomposition(torch.from_numpy(feats))["between"] > 0.8


def test_attention_entropy_against_hand_computed_softmaxes():
    uniform = torch.full((2, 3, 5, 5), 0.2)
    assert metrics.attention_entropy(uniform)["ratio"] == pytest.approx(1)
    assert metrics.attention_entropy(uniform)["max"] == pytest.approx(math.log(5))
    assert metrics.attention_entropy(torch.eye(4))["entropy"] == pytest.approx(0)
    got = metrics.attention_entropy(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    h = (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) + math.log(2)) / 2
    assert got["entropy"] == pytest.approx(h) and got["ratio"] == pytest.approx(h / math.log(2))
    with pytest.raises(ValueError):
        metrics.attention_entropy(torch.ones(3, 1))


def _truths(shape=(24, 22, 20), seed=4):
    """Truth of each modality kind in the data layer's unit, with its foreground: MRI z-scored over
    its nonzero (brain) voxels, CT in [-1, 1] with air -1 outside the body, PET SUV / 10 >= 0."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    fg = (((grid - np.array(shape) / 2) / (np.array(shape) * 0.4)) ** 2).sum(-1) < 1
    tissue = 2 + np.sin(grid[..., 0] / 3.0) + 0.1 * rng.standard_normal(shape)
    mri = np.where(fg, (tissue - tissue[fg].mean()) / tissue[fg].std(), 0.0)
    ct = np.where(fg, np.clip((40 + 300 * np.cos(grid[..., 1] / 4.0)) / 1000.0, -1, 1), -1.0)
    pet = np.where(fg, np.abs(tissue) / 10.0, 0.0)
    return fg, {"mri": mri, "ct": ct, "pet": pet}


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
@pytest.mark.parametrize("kind", ("mri", "ct", "pet"))
def test_a_perfect_prediction_scores_perfectly_in_every_protocol_and_kind(protocol, kind):
    fg, truths = _truths()
    gt = truths[kind]
    out = metrics.transfer_metrics(gt.copy(), gt, fg, protocol, tumour=fg & (np.arange(fg.shape[0]) < 12)[:, None, None],
                                   kind=kind)
    if protocol == "reference" and kind == "mri":  # the z-scoring is recomputed in float64
        assert out["psnr"] > 250 and out["nmse"] < 1e-24 and out["ssim"] == pytest.approx(1, abs=1e-12)
    else:
        assert out["psnr"] == math.inf and out["nmse"] == 0 and out["ssim"] == pytest.approx(1, abs=1e-12)


def test_reference_protocol_keeps_ct_and_pet_in_their_unit():
    """CT / PET predictions are not z-scored (their truth is not): the reference numbers are
    scikit-image's on the prediction pasted into the truth's background."""
    fg, truths = _truths()
    for kind in ("ct", "pet"):
        gt = truths[kind]
        pred = gt + 0.05 * np.sin(np.arange(gt.size).reshape(gt.shape))
        out = metrics.transfer_metrics(pred, gt, fg, "reference", kind=kind)
        pasted = np.where(fg, pred, gt)
        r = ptp_range(pasted, gt)
        assert out["psnr"] == pytest.approx(peak_signal_noise_ratio(gt, pasted, data_range=r), abs=1e-6)
        assert out["ssim"] == pytest.approx(structural_similarity(pasted, gt, data_range=r), abs=1e-5)
    rows = metrics.transfer_case("c", "pet", [truths["ct"]], [truths["ct"]], fg, ["ct"], "reference")
    assert rows[0]["kind"] == "ct" and rows[0]["psnr"] == math.inf


# ---------------------------------------------------------------------------------------------
# Lesion-wise metrics against the official BraTS evaluation (brats-evaluation on panoptica)

GLI_GROUPS = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,), "rc": (4,), "netc": (1,), "snfh": (2,)}


def _lesion_label_maps(case, shape=(28, 30, 26)):
    """A BraTS 2024 label-map pair (labels 1-4 in ellipsoid lesions): shifted copies, unrelated
    maps, ET missing from the prediction, RC empty in both."""
    def blobs(n, seed):
        r = np.random.default_rng(seed)
        lab = np.zeros(shape, np.uint8)
        grid = np.indices(shape).transpose(1, 2, 3, 0)
        for _ in range(n):
            c, rad = r.integers(3, np.array(shape) - 3), r.uniform(1.5, 4, 3)
            lab[(((grid - c) / rad) ** 2).sum(-1) <= 1] = r.choice([1, 2, 3, 4])
        return lab
    ref = blobs(4 + case, case)
    pred = ndimage.shift(ref, (1, 0, -1), order=0) if case % 2 else blobs(3 + case, 100 + case)
    if case == 4:
        pred[pred == 3] = 0
    if case == 5:
        ref[ref == 4] = 0
        pred[pred == 4] = 0
    return pred, ref


@pytest.mark.parametrize("case", range(6))
def test_lesion_metrics_equal_the_official_brats_evaluation(case):
    """Lesion counts, matching, lesion-wise Dice / HD95 and global Dice equal panoptica's run with
    brats-evaluation's bundled BraTS glioma config, at 1 mm and at another spacing; the global
    HD95 equals panoptica's at 1 mm (it ignores the spacing there) and its HD95 function with
    the spacing elsewhere."""
    panoptica = pytest.importorskip("panoptica")
    from importlib.resources import files

    from panoptica.metrics.hausdorff_distance import _compute_hausdorff_distance95
    config = str(files("brats_evaluation").joinpath("configs", "config_gli.yaml"))
    evaluator = panoptica.Panoptica_Evaluator.load_from_config(config)
    pred, ref = _lesion_label_maps(case)
    spacing = (1.0, 1.0, 1.0) if case < 2 else (1.2, 0.9, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = evaluator.evaluate(pred, ref, voxelspacing=spacing, verbose=False)
    for group, values in GLI_GROUPS.items():
        t = theirs[group].to_dict(True)
        p, g = np.isin(pred, values), np.isin(ref, values)
        ours = metrics.lesion_metrics(p, g, spacing)
        want = {"n_ref": t["n_ref_instances"], "n_pred": t["n_pred_instances"], "tp": t["tp"], "fp": t["fp"],
                "fn": t["fn"], "f1": t["rq"], "dice": t["sq_dsc"], "hd95": t["sq_hd95"],
                "global_dice": t["global_bin_dsc"]}
        if spacing == (1.0, 1.0, 1.0) or not (p & g).any():
            want["global_hd95"] = t["global_bin_hd95"]
        else:
            want["global_hd95"] = _compute_hausdorff_distance95(g, p, voxelspacing=spacing)
        for k, v in want.items():
            v = float(v)
            assert (math.isnan(ours[k]) and math.isnan(v)) or ours[k] == pytest.approx(v, rel=1e-9, abs=1e-12), \
                (case, group, k, ours[k], v)
