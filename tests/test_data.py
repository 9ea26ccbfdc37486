"""Tests of data.py and demo_data.py against MONAI, nibabel and brute-force references."""
import itertools
import json
import os
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cache  # noqa: E402
import data  # noqa: E402
import layouts  # noqa: E402
import demo_data  # noqa: E402

SHAPE = (20, 24, 16)
LPS = np.array([[-1.0, 0, 0, 19], [0, -1.0, 0, 23], [0, 0, 1.0, -5], [0, 0, 0, 1]])
# voxel axes (y, z, x)-like and anisotropic: exercises transposes as well as flips
PERMUTED = np.array([[0, 0, -1.5, 10], [1.2, 0, 0, -3], [0, -0.9, 0, 7], [0, 0, 0, 1]])


def save(path, arr, affine=LPS):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def brain_case(rng, shape=SHAPE, label_values=(1, 2, 4)):
    """Four positive MRI arrays inside an ellipsoid 'brain' and a label with a nested tumour."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.8, 0.7, 0.75])[:, None, None, None]) ** 2).sum(0))
    brain = r < 1
    mri = [np.where(brain, rng.integers(50, 1000, shape), 0).astype(np.int16) for _ in range(4)]
    t = np.sqrt(((grid - np.array([0.2, -0.1, 0.1])[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    ncr, ed, et = label_values
    label[brain & (t < 0.55)] = ed
    label[brain & (t < 0.35)] = et
    label[brain & (t < 0.2)] = ncr
    return mri, label


def make_brats(root, n=2, style="2021", affine=LPS, seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    names = ["t1", "t1ce", "t2", "flair"] if style == "2021" else ["t1n", "t1c", "t2w", "t2f"]
    sep = "_" if style == "2021" else "-"
    out = {}
    for i in range(n):
        cid = f"case_{i:02d}"
        mri, label = brain_case(rng, shape, (1, 2, 4) if style == "2021" else (1, 2, 3))
        for name, a in zip(names, mri):
            save(root / cid / f"{cid}{sep}{name}.nii.gz", a, affine)
        save(root / cid / f"{cid}{sep}seg.nii.gz", label, affine)
        out[cid] = (mri, label)
    return out


def make_autopet(root, n=2, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        pid = f"PETCT_{i:03d}"
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, k) for k in SHAPE], indexing="ij"))
        body = np.sqrt(((grid / 0.8) ** 2).sum(0)) < 1
        ct = np.where(body, rng.normal(40, 30, SHAPE), -1000).astype(np.int16)
        lung = np.sqrt((((grid - np.array([0.3, 0, 0])[:, None, None, None]) / 0.2) ** 2).sum(0)) < 1
        ct[lung] = -850  # a hole inside the body that the body mask must fill
        ct[10, 12, 3] = 2500  # bone above the window
        suv = np.where(body, rng.uniform(0.5, 3, SHAPE), 0).astype(np.float32)
        suv[10, 12, 8] = 80.0  # a very hot lesion voxel: must survive normalisation unclipped
        suv[9, 9, 9] = -0.3
        seg = np.zeros(SHAPE, np.uint8)
        seg[9:12, 11:14, 7:10] = 1
        study = root / pid / "03-12-2006-NA-PET-CT"
        save(study / "CTres.nii.gz", ct)
        save(study / "SUV.nii.gz", suv)
        save(study / "SEG.nii.gz", seg)
        out[pid] = (ct, suv, seg, body, lung)
    return out


def make_nnunet(root, n=2):
    rng = np.random.default_rng(1)
    for i in range(n):
        mri, label = brain_case(rng)
        for k, a in enumerate(mri[:2]):
            save(root / "imagesTr" / f"BRATS_{i:03d}_{k:04d}.nii.gz", a)
        save(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", label)
    meta = {"channel_names": {"0": "FLAIR", "1": "T1w"},
            "labels": {"background": 0, "necrotic core": 1, "edema": 2, "enhancing tumor": 4},
            "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    arrays = {
        "brats": make_brats(base / "brats"),
        "brats_nested": make_brats(base / "brats_nested" / "HGG", n=1),
        "brats2023": make_brats(base / "brats2023", style="2023"),
        "permuted": make_brats(base / "permuted", n=1, affine=PERMUTED),
        "autopet": make_autopet(base / "autopet"),
    }
    make_nnunet(base / "nnunet")
    entries = [{"image": [f"brats/{c}/{c}_{m}.nii.gz" for m in ("flair", "t1ce", "t1", "t2")],
                "label": f"brats/{c}/{c}_seg.nii.gz", "fold": 0} for c in ("case_00", "case_01")]
    (base / "datalist.json").write_text(json.dumps({"training": entries}))
    return base, arrays


# ---------------------------------------------------------------------------------------------
# Layouts


def test_detection_and_modality_order(folders):
    base, _ = folders
    s = layouts.resolve(base / "brats")
    assert (s.layout, s.modalities, s.label_kind) == ("brats", ["t1", "t1ce", "t2", "flair"], "brats")
    assert [c.id for c in s.cases] == ["case_00", "case_01"]
    assert s.cases[0].images["t1ce"].name == "case_00_t1ce.nii.gz" and s.cases[0].label.name == "case_00_seg.nii.gz"
    assert list(s.regions) == ["tc", "wt", "et"]
    assert [c.id for c in layouts.resolve(base / "brats_nested").cases] == ["case_00"]
    s = layouts.resolve(base / "brats2023")
    assert (s.layout, s.modalities, s.label_kind) == ("brats2023", ["t1", "t1ce", "t2", "flair"], "brats2023")
    assert s.cases[0].images["flair"].name == "case_00-t2f.nii.gz"
    s = layouts.resolve(base / "autopet")
    assert (s.layout, s.modalities, s.label_kind) == ("autopet", ["ct", "pet"], "autopet")
    assert [c.id for c in s.cases] == ["PETCT_000", "PETCT_001"]
    assert s.cases[0].images["pet"].name == "SUV.nii.gz" and s.cases[0].label.name == "SEG.nii.gz"
    s = layouts.resolve(base / "nnunet")
    assert (s.layout, s.modalities, s.label_kind) == ("nnunet", ["flair", "t1"], "brats")
    assert s.regions == {"tc": (1, 4), "wt": (1, 2, 4), "et": (4,)}
    assert s.cases[1].images["t1"].name == "BRATS_001_0001.nii.gz"
    s = layouts.resolve(base / "datalist.json")
    assert (s.layout, s.modalities, s.label_kind) == ("datalist", ["flair", "t1ce", "t1", "t2"], "brats")
    assert [c.id for c in s.cases] == ["case_00", "case_01"]
    # subsets keep the order asked for, aliases map to the BraTS 2021 names
    s = layouts.resolve(base / "brats2023", "t2f,t1n")
    assert s.modalities == ["flair", "t1"] and list(s.cases[0].images) == ["flair", "t1"]
    assert s.cases[0].images["t1"].name == "case_00-t1n.nii.gz"
    with pytest.raises(ValueError, match="available t1, t1ce, t2, flair"):
        layouts.resolve(base / "brats", "t1,pet")


def test_preprocessing_matches_monai(folders):
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged,
                                  NormalizeIntensityd, Orientationd)
    base, _ = folders
    keys = ["image", "label"]
    ras = (("L", "R"), ("P", "A"), ("I", "S"))
    monai = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS", labels=ras),
                     CropForegroundd(keys, source_key="image"),
                     NormalizeIntensityd("image", nonzero=True, channel_wise=True)])
    for name in ("brats", "permuted", "brats2023"):
        spec = layouts.resolve(base / name)
        case = spec.cases[0]
        vol = data.load_case(case, spec, use_cache=False)
        ref = monai({"image": [str(p) for p in case.images.values()], "label": str(case.label)})
        assert vol.image.shape == tuple(ref["image"].shape) and vol.image.dtype == np.float32
        np.testing.assert_allclose(vol.image, ref["image"].numpy(), atol=2e-6)
        assert np.array_equal(vol.label, ref["label"].numpy()[0])
        for c in range(4):  # z-score over each modality's nonzero mask, background kept at 0
            x = vol.image[c]
            m = x != 0
            assert abs(x[m].mean()) < 1e-5 and abs(x[m].std() - 1) < 1e-5
        assert np.array_equal(vol.fg, (vol.image != 0).any(0))
        np.testing.assert_allclose(np.array(vol.record["affine_out"]), ref["image"].affine.numpy(), atol=1e-5)


def test_ct_pet_normalisation_and_body_mask(folders):
    base, arrays = folders
    spec = layouts.resolve(base / "autopet")
    vol = data.load_case(spec.cases[0], spec, use_cache=False)
    ct, suv, seg, body, lung = arrays["autopet"]["PETCT_000"]
    rec = vol.record
    assert rec["perm"] == [0, 1, 2] and rec["flip"] == [True, True, False]
    sl = tuple(slice(a, b) for a, b in rec["box"])
    canon = lambda a: a[::-1, ::-1, :][sl]  # noqa: E731 (LPS -> RAS by hand)
    expect_ct = np.empty(canon(ct).shape, np.float32)
    expect_pet = np.empty_like(expect_ct)
    for idx in np.ndindex(expect_ct.shape):  # brute force, voxel by voxel
        hu = float(canon(ct)[idx])
        expect_ct[idx] = (min(max(hu, -1000.0), 1000.0) + 1000.0) / 1000.0 - 1.0
        expect_pet[idx] = max(float(canon(suv)[idx]), 0.0) / 10.0
    np.testing.assert_allclose(vol.image[0], expect_ct, atol=1e-6)
    np.testing.assert_allclose(vol.image[1], expect_pet, atol=1e-6)
    assert vol.image[1].max() == pytest.approx(8.0)  # SUV 80 kept: no top clipping
    assert vol.fg[canon(lung)].all() and np.array_equal(vol.fg, canon(body))  # the lung is filled
    assert np.array_equal(vol.regions[0], canon(seg).astype(np.float32))


def test_label_to_regions_both_conventions(folders):
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses
    rng = np.random.default_rng(0)
    for kind in ("brats", "brats2023"):
        values, regions = data.LABELS[kind]
        label = rng.choice(values, size=(6, 7, 5)).astype(np.uint8)
        got = data.label_to_regions(label, regions)
        et = 4 if kind == "brats" else 3
        expect = np.zeros((3, *label.shape), np.float32)
        for idx in np.ndindex(label.shape):
            v = label[idx]
            expect[(0, *idx)] = v in (1, et)  # TC: necrotic core and enhancing
            expect[(1, *idx)] = v in (1, 2, et)  # WT: everything
            expect[(2, *idx)] = v == et  # ET
        assert np.array_equal(got, expect)
        if kind == "brats":
            assert np.array_equal(got, np.asarray(ConvertToMultiChannelBasedOnBratsClasses()(label)).astype(np.float32))
    # through load_case, on a BraTS 2023 folder
    base, arrays = folders
    spec = layouts.resolve(base / "brats2023")
    vol = data.load_case(spec.cases[0], spec, use_cache=False)
    assert set(np.unique(vol.label)) == {0, 1, 2, 3}
    assert np.array_equal(vol.regions[2], (vol.label == 3).astype(np.float32))
    assert np.array_equal(vol.regions[0], np.isin(vol.label, (1, 3)).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Restoration to the original grid


@pytest.mark.parametrize("name", ["brats", "permuted"])
def test_round_trip_restore(folders, tmp_path, name):
    base, _ = folders
    spec = layouts.resolve(base / name)
    case = spec.cases[0]
    src = nib.load(str(case.label))
    orig = np.asanyarray(src.dataobj)
    for pad_to in (None, 32):
        vol = data.load_case(case, spec, use_cache=False, pad_to=pad_to)
        if pad_to:
            assert all(n >= 32 for n in vol.image.shape[1:]) and vol.image.shape[1:] == vol.label.shape
        assert np.array_equal(data.restore(vol.label, vol.record), orig)
        # the canonical grid agrees with nibabel's as_closest_canonical
        canon = np.asanyarray(nib.as_closest_canonical(src).dataobj)
        rec = vol.record
        assert np.array_equal(data.to_canonical(orig, rec["perm"], rec["flip"]), canon)
        # forward(restore(r)) == r for any array r in the preprocessed grid, channels too
        r = np.random.default_rng(0).standard_normal((3, *vol.fg.shape)).astype(np.float32)
        back = data.to_canonical(data.restore(r, rec), rec["perm"], rec["flip"])
        back = back[(Ellipsis, *[slice(a, b) for a, b in rec["box"]])]
        unpadded = r[(Ellipsis, *[slice(p0, n - p1) for (p0, p1), n in zip(rec["pad"], r.shape[1:])])]
        assert np.array_equal(back, unpadded)
    # written files: identical voxels, the source affine and header fields
    out = data.write_nifti(vol.label, vol.record, tmp_path / "pred" / "seg.nii.gz")
    img = nib.load(str(out))
    assert np.array_equal(np.asanyarray(img.dataobj), orig) and img.get_data_dtype() == np.uint8
    assert np.array_equal(img.affine, src.affine) and img.header.get_zooms() == src.header.get_zooms()
    assert img.header["sform_code"] == src.header["sform_code"]
    probs = data.write_nifti(vol.regions, vol.record, tmp_path / "probs.nii")
    assert nib.load(str(probs)).shape == orig.shape + (3,)
    assert not [p for p in tmp_path.rglob("*.tmp*")]
    with pytest.raises(ValueError, match="not the preprocessed shape"):
        data.restore(vol.label[1:], vol.record)


# ---------------------------------------------------------------------------------------------
# Cache


def within_quantisation(stored, ref):
    """cache.py's stated error of a b2nd image: at most max|x| / 65534 of each channel (and
    float32's rounding of the product)."""
    stored = np.asarray(stored)
    peak = np.abs(ref).reshape(len(ref), -1).max(axis=1)
    bound = peak / 65534 + 2 * np.finfo(np.float32).eps * peak
    return stored.shape == ref.shape and bool(np.all(np.abs(stored - ref) <= bound[:, None, None, None]))


@pytest.mark.parametrize("fmt", cache.FORMATS)
def test_cache_reuse_invalidation_and_interrupted_write(tmp_path, monkeypatch, fmt):
    make_brats(tmp_path / "ds", n=1)
    spec = layouts.resolve(tmp_path / "ds")
    case = spec.cases[0]
    store = tmp_path / "cache"
    calls = []
    real = data._preprocess
    monkeypatch.setattr(data, "_preprocess", lambda *a, **k: calls.append(1) or real(*a, **k))
    same = np.array_equal if fmt == "npy" else within_quantisation

    # several threads (as ranks/workers would) ask at once: one build, one entry
    out = []
    threads = [threading.Thread(target=lambda: out.append(data.load_case(case, spec, store, fmt=fmt)))
               for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1 and len(out) == 4
    entries = [p for p in store.iterdir() if p.is_dir()]
    assert len(entries) == 1
    vol = out[0]
    assert isinstance(vol.image, np.memmap if fmt == "npy" else cache.Stored) and vol.image.dtype == np.float32
    ref = data.load_case(case, spec, use_cache=False)
    assert len(calls) == 2  # the uncached load above
    assert same(vol.image, ref.image) and np.array_equal(vol.label, ref.label) and np.array_equal(vol.fg, ref.fg)
    if fmt != "npy":  # the error is what quantisation alone gives, and background stays 0
        q, scale = cache.quantise(ref.image)
        assert np.array_equal(np.asarray(vol.image), q * scale[:, None, None, None])
        assert np.array_equal(np.asarray(vol.image) == 0, ref.image == 0)
    # reuse: no rebuild, whichever format is asked for next (an entry of either is read)
    again = data.load_case(case, spec, store)
    assert len(calls) == 2 and np.array_equal(again.image, vol.image)
    # pickles (DataLoader workers with spawn) carry the path, not the voxels
    blob = pickle.dumps(again)
    assert len(blob) < 20_000 and np.array_equal(pickle.loads(blob).image, vol.image)
    # asking for the other format by name rebuilds the entry in it
    other = next(f for f in cache.FORMATS if f != fmt)
    assert data.load_case(case, spec, store, fmt=other).record["format"] == other and len(calls) == 3
    vol = data.load_case(case, spec, store, fmt=fmt)
    assert len(calls) == 4 and len([p for p in store.iterdir() if p.is_dir()]) == 1

    # a changed source is rebuilt
    t1 = case.images["t1"]
    arr = np.asanyarray(nib.load(str(t1)).dataobj).astype(np.int16)
    save(t1, np.where(arr > 0, arr + np.random.default_rng(9).integers(0, 300, arr.shape), 0).astype(np.int16))
    st = os.stat(t1)
    os.utime(t1, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = data.load_case(case, spec, store, fmt=fmt)
    assert len(calls) == 5
    assert not np.array_equal(changed.image[0], vol.image[0]) and np.array_equal(changed.image[1:], vol.image[1:])
    assert changed.record["sources"] != vol.record["sources"]
    assert same(changed.image, data.load_case(case, spec, use_cache=False).image)

    # an interrupted build (arrays written, record not yet) leaves no entry and no temp folder
    store2 = tmp_path / "cache2"
    real_text = data.json_text

    def dying(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(data, "json_text", dying)
    with pytest.raises(KeyboardInterrupt):
        data.load_case(case, spec, store2, fmt=fmt)
    assert [p for p in store2.iterdir() if p.is_dir()] == []
    monkeypatch.setattr(data, "json_text", real_text)
    # a builder killed outright leaves its temp folder: it is never read, and the next build
    # (under the lock) removes it
    entry = store2 / data._entry_name(case, None)
    left = entry.with_name(f".{entry.name}.999.1.tmp")
    left.mkdir()
    (left / "image.npy").write_bytes(b"half")
    assert same(data.load_case(case, spec, store2, fmt=fmt).image, changed.image if fmt == "npy" else
                data.load_case(case, spec, use_cache=False).image)
    assert sorted(p.name for p in store2.iterdir() if p.is_dir()) == [entry.name]


def _prepare_line(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    m = re.search(r"cached (\d+) cases of .*: (\d+) built, (\d+) already there", out)
    assert m, out
    return [int(g) for g in m.groups()]


def test_prepare_processes_sharing_one_cache(tmp_path):
    """Two `data.py prepare` at once on one cache folder (as jobs on two nodes would): every entry
    built once in all, one entry per case, no temp folder left; then a resumed prepare with two
    workers builds nothing, and torchrun-style ranks split the cases."""
    n = 6
    make_brats(tmp_path / "ds", n=n, shape=(80, 96, 64))
    store = tmp_path / "cache"
    cmd = [sys.executable, str(Path(data.__file__)), "prepare", "--data", str(tmp_path / "ds"), "--cache", str(store)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    lines = [_prepare_line(p) for p in procs]
    assert [a for a, _, _ in lines] == [n, n]
    assert sum(b for _, b, _ in lines) == n  # each entry built by one of them
    entries = sorted(p.name for p in store.iterdir() if p.is_dir())
    assert len(entries) == n and not [e for e in entries if ".tmp" in e]
    spec = layouts.resolve(tmp_path / "ds")
    for case in spec.cases:  # what they built is what one process builds
        got, ref = data.load_case(case, spec, store), data.load_case(case, spec, use_cache=False)
        assert within_quantisation(got.image, ref.image) and np.array_equal(got.label, ref.label)
    again = subprocess.Popen(cmd + ["--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _prepare_line(again) == [n, 0, n]
    ranks = [subprocess.Popen(cmd[:-1] + [str(tmp_path / "ranks")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    assert [_prepare_line(p) for p in ranks] == [[n // 2, n // 2, 0]] * 2
    assert len([p for p in (tmp_path / "ranks").iterdir() if p.is_dir()]) == n


@pytest.mark.parametrize("fmt", ["b2nd", "tiles"])
def test_stored_slices_like_numpy(tmp_path, fmt):
    """cache.Stored against the numpy array it stores: the slices a crop, a figure and a full
    read take, an int channel then its slices, and the crop of sampling._crop (fills beyond)."""
    import sampling

    rng = np.random.default_rng(0)
    image = (rng.normal(size=(3, 37, 70, 21)) * (rng.random((3, 37, 70, 21)) > 0.3)).astype(np.float32)
    fg, label = image[0] != 0, rng.integers(0, 4, image.shape[1:]).astype(np.uint8)
    options = dict(chunk=16, block=8) if fmt == "b2nd" else dict(tile=(5, 16))
    rec = cache.write(tmp_path, image, fg, label, fmt, **options)
    im, f, lab = cache.read(tmp_path, rec)
    ref = np.asarray(im)  # compared with the decoded whole: slicing must not change a value
    assert within_quantisation(ref, image) and np.array_equal(np.asarray(f), fg)
    assert np.array_equal(np.asarray(lab), label) and im.shape == image.shape and len(im) == 3
    for idx in [(slice(None), slice(3, 20), slice(60, 70), slice(0, 5)), (1, slice(30, 37)), (Ellipsis, 5),
                (slice(1, 3),), (2, 4, 5, 6), (Ellipsis, slice(2, 9), slice(0, 1), slice(20, 21))]:
        assert np.array_equal(im[idx], ref[idx]), idx
    ch = im[2]
    assert isinstance(ch, cache.Stored) and ch.shape == image.shape[1:] and np.array_equal(ch[5:9, :, 3], ref[2, 5:9, :, 3])
    assert np.array_equal(np.asarray(ch), ref[2]) and np.array_equal(lab[1:4, 2], label[1:4, 2])
    for start in [(0, 0, 0), (-3, 50, 10), (30, -2, -5)]:
        fill = np.array([0.0, -1.0, 2.0], np.float32)
        assert np.array_equal(sampling._crop(im, start, (16, 24, 16), fill), sampling._crop(ref, start, (16, 24, 16), fill))
        assert np.array_equal(sampling._crop(lab, start, (16, 24, 16), 0), sampling._crop(label, start, (16, 24, 16), 0))
    with pytest.raises(TypeError):
        im[::2]


def test_tiles_against_numpy_and_their_bytes(tmp_path):
    """cache.Tiled against the array it stores, by brute force over random selections (ints,
    negative ints, slices past the ends, empty ones) and tile sides: a background that is not 0
    (CT air), an array all background, a bool mask; and the bytes: a brain-like volume (an
    ellipsoid in its box) keeps only its boxes, an array of distinct values (no background) keeps every voxel."""
    rng = np.random.default_rng(3)
    shape = (29, 34, 23)
    z, y, x = np.ogrid[:29, :34, :23]
    inside = ((z - 14) / 14.5) ** 2 + ((y - 16.5) / 17) ** 2 + ((x - 11) / 11.5) ** 2 < 1
    ct = np.where(inside, rng.integers(-32767, 32767, shape), -32767).astype(np.int16)[None]
    mri = (rng.integers(-900, 900, (2, *shape)) * inside).astype(np.int16)
    arrays = {"ct": ct, "mri": mri, "fg": inside, "empty": np.zeros(shape, np.uint8),
              "full": (rng.permutation(2 * 29 * 34 * 23) - 20000).reshape(2, *shape).astype(np.int16)}
    for tile in [(16, 16), (1, 1), (4, 7), (40, 40)]:
        for name, a in arrays.items():
            folder = tmp_path / f"{name}-{tile[0]}x{tile[1]}"
            folder.mkdir()
            cache._write_tiles(folder, name, a, tile)
            t = cache.Tiled(folder, name)
            assert t.shape == a.shape and t.dtype == a.dtype and np.array_equal(np.asarray(t), a)
            for _ in range(40):
                idx = []
                for n in a.shape[: rng.integers(1, a.ndim + 1)]:
                    kind = rng.integers(0, 3)
                    lo, hi = sorted(int(v) for v in rng.integers(-n - 3, n + 4, 2))
                    idx.append(int(rng.integers(-n, n)) if kind == 0 else slice(None) if kind == 1 else slice(lo, hi))
                got, want = t[tuple(idx)], a[tuple(idx)]
                assert got.shape == want.shape and np.array_equal(got, want), (name, tile, idx)
            assert np.array_equal(t[..., 3], a[..., 3])
            stored = (folder / f"{name}.tiles.npy").stat().st_size - 128
            if name == "empty":
                assert stored == 0
            if name == "full":
                assert stored == a.nbytes
            if name in ("ct", "mri") and tile == (4, 7):  # the boxes of an ellipsoid: about its volume
                assert inside.mean() * a.nbytes < stored < 0.75 * a.nbytes
    with pytest.raises(TypeError):
        t[::2]
    with pytest.raises(IndexError):
        t[0, 40]


@pytest.mark.parametrize("fmt", [f for f in cache.FORMATS if f != "npy"])
def test_crops_of_each_format_are_those_of_the_float32_cache(tmp_path, fmt):
    """The training crops (CropDataset: foreground draws, crops past the border, region maps)
    drawn from an entry of each format are the float32 npy entry's, the image within the
    quantisation error once dequantised (int16 entries give int16 crops and their scales), in a
    batch too, and in one that mixes formats."""
    import sampling

    make_brats(tmp_path / "ds", n=2, shape=(40, 44, 36))
    spec = layouts.resolve(tmp_path / "ds")
    crops = {}
    for f in ("npy", fmt):
        ds = sampling.CropDataset(spec.cases, (24, 48, 16), fg_fraction=0.5, samples_per_epoch=12, seed=1,
                                  spec=spec, cache_dir=tmp_path / f)
        data.prepare(spec, tmp_path / f, fmt=f)
        crops[f] = [ds[i] for i in range(12)]
    peak = {c.id: np.abs(data.load_case(c, spec, use_cache=False).image).reshape(4, -1).max(axis=1)
            for c in spec.cases}  # the stated error is relative to the channel's peak in the volume
    for a, b in zip(crops["npy"], crops[fmt]):
        assert a["id"] == b["id"] and torch.equal(a["start"], b["start"])
        for k in ("fg", "label", "regions"):
            assert torch.equal(a[k], b[k]), k
        bound = (peak[a["id"]] / 65534 + 2 * np.finfo(np.float32).eps * peak[a["id"]]).astype(np.float32)
        assert a["image"].dtype == torch.float32 and torch.equal(a["scale"], torch.ones(4))
        assert b["image"].dtype == torch.int16 and np.allclose(b["scale"], peak[b["id"]] / cache.LEVELS)
        image = sampling.dequantise(b["image"], b["scale"])
        assert (image - a["image"]).abs().amax(dim=(1, 2, 3)).le(torch.from_numpy(bound)).all()
    mixed = sampling.collate([crops["npy"][0], crops[fmt][1]])  # entries of two formats in one batch
    assert mixed["image"].dtype == torch.float32 and torch.equal(mixed["scale"], torch.ones(2, 4))
    assert torch.equal(mixed["image"][1], sampling.dequantise(crops[fmt][1]["image"], crops[fmt][1]["scale"]))
    batch = sampling.collate(crops[fmt][:3])
    assert batch["image"].dtype == torch.int16
    assert torch.equal(sampling.dequantise(batch["image"], batch["scale"]),
                       torch.stack([sampling.dequantise(c["image"], c["scale"]) for c in crops[fmt][:3]]))
    assert any((c["start"] < 0).any() for c in crops["npy"])  # some crops reach past the volume (filled)


def test_b2nd_crops_in_forked_workers_after_the_parent_decoded(tmp_path):
    """DataLoader workers are forked from a process that has decoded entries (validation,
    figures): blosc2 with a thread pool there makes forked workers hang on their first decode."""
    import torch

    import sampling

    make_brats(tmp_path / "ds", n=1, shape=(64, 72, 48))
    spec = layouts.resolve(tmp_path / "ds")
    vol = data.load_case(spec.cases[0], spec, tmp_path / "cache", fmt="b2nd")
    assert isinstance(vol.image, cache.Stored)
    np.asarray(vol.image)  # the parent decodes the whole image
    ds = sampling.CropDataset([vol], (32, 32, 32), fg_fraction=0.5, samples_per_epoch=3, seed=0)
    here = [ds[i] for i in range(3)]
    forked = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, timeout=60,
                                              multiprocessing_context="fork"))
    assert len(forked) == 3
    for a, b in zip(here, forked):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


# ---------------------------------------------------------------------------------------------
# Bad input


def _copy_brats(tmp_path, name):
    make_brats(tmp_path / name, n=1)
    return tmp_path / name / "case_00"


def _bad(tmp_path, problem):
    folder = _copy_brats(tmp_path, problem)
    t1ce = folder / "case_00_t1ce.nii.gz"
    t2 = folder / "case_00_t2.nii.gz"
    if problem == "missing":
        t1ce.unlink()
        return folder.parent, FileNotFoundError, "case_00_t1ce.nii.gz: missing file"
    if problem == "truncated":
        raw = t1ce.read_bytes()
        t1ce.write_bytes(raw[: len(raw) // 2])
        return folder.parent, ValueError, "case_00_t1ce.nii.gz: cannot read the voxels, corrupt or truncated gzip"
    if problem == "corrupt":
        t1ce.write_bytes(b"\x1f\x8b" + os.urandom(400))
        return folder.parent, ValueError, "case_00_t1ce.nii.gz: not a readable NIfTI"
    if problem == "shape":
        save(t2, np.ones((20, 24, 15), np.int16))
        return folder.parent, ValueError, r"case_00_t2.nii.gz: shape \(20, 24, 15\) differs"
    if problem == "affine":
        aff = LPS.copy()
        aff[0, 3] += 2.0
        save(t2, np.asanyarray(nib.load(str(t2)).dataobj), aff)
        return folder.parent, ValueError, "case_00_t2.nii.gz: affine differs"
    if problem == "nan":
        a = np.asanyarray(nib.load(str(t2)).dataobj).astype(np.float32)
        a[3, 4, 5] = np.nan
        a[4, 4, 5] = np.inf
        save(t2, a)
        return folder.parent, ValueError, "case_00_t2.nii.gz: 2 NaN/Inf voxels"
    if problem == "4d":
        save(t2, np.ones((*SHAPE, 3), np.int16))
        return folder.parent, ValueError, r"case_00_t2.nii.gz: 4-D image of shape \(20, 24, 16, 3\), expected 3-D"
    if problem == "labels":
        seg = folder / "case_00_seg.nii.gz"
        a = np.asanyarray(nib.load(str(seg)).dataobj).copy()
        a[a == 4] = 3
        save(seg, a)
        return folder.parent, ValueError, r"case_00_seg.nii.gz: label values \[3\] outside the brats set .*BraTS 2023"
    if problem == "empty_image":
        for m in ("t1", "t1ce", "t2", "flair"):
            save(folder / f"case_00_{m}.nii.gz", np.zeros(SHAPE, np.int16))
        return folder.parent, ValueError, "case_00_t1.nii.gz: no foreground"
    raise AssertionError(problem)


@pytest.mark.parametrize("problem", ["missing", "truncated", "corrupt", "shape", "affine", "nan", "4d", "labels",
                                     "empty_image"])
def test_bad_input_messages(tmp_path, problem):
    root, exc, message = _bad(tmp_path, problem)
    spec = layouts.resolve(root)
    with pytest.raises(exc, match=message):
        data.load_case(spec.cases[0], spec, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    problems, _ = data.check_dataset(spec)
    assert len(problems) == 1 and __import__("re").search(message, problems[0]), problems
    assert "\n" not in problems[0]


def test_bad_folders_and_check_command(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: empty folder"):
        layouts.resolve(tmp_path / "empty")
    save(tmp_path / "other" / "scans" / "scan.nii.gz", np.ones(SHAPE, np.int16))
    with pytest.raises(ValueError, match="other: no known dataset layout"):
        layouts.resolve(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="nowhere: no such file"):
        layouts.resolve(tmp_path / "nowhere")
    # several broken cases: every problem, one line each
    root = tmp_path / "mixed"
    make_brats(root, n=3)
    (root / "case_01" / "case_01_flair.nii.gz").unlink()
    a = np.asanyarray(nib.load(str(root / "case_02" / "case_02_seg.nii.gz")).dataobj).copy()
    a[0, 0, 0] = 7
    save(root / "case_02" / "case_02_seg.nii.gz", a)
    assert data.main(["check", "--data", str(root)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "case_01_flair.nii.gz: missing file" in lines[0] and "[7]" in lines[1]
    assert data.main(["check", "--data", str(tmp_path / "empty")]) == 1
    good = tmp_path / "good"
    make_brats(good, n=1)
    assert data.main(["check", "--data", str(good)]) == 0
    run = subprocess.run([sys.executable, str(Path(data.__file__)), "check", "--data", str(root)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and len(run.stdout.strip().splitlines()) == 2


def test_check_recognises_brats2024_from_label_4(tmp_path, capsys):
    """BraTS 2023 file names with a label 4 (the resection cavity) can only be BraTS 2024: check
    takes that convention by itself; forced to brats2023 the 4 is a problem again; without a 4
    the set stays BraTS 2023."""
    root = tmp_path / "brats2024"
    make_brats(root, n=3, style="2023")
    seg = root / "case_01" / "case_01-seg.nii.gz"
    a = np.asanyarray(nib.load(str(seg)).dataobj).copy()
    a[:2] = 4  # a cavity slab, beside labels 1-3
    save(seg, a)
    spec = layouts.resolve(root)
    assert spec.label_kind == "brats2023"
    problems, found = data.check_dataset(spec)
    assert problems == [] and found.label_kind == "brats2024" and found.regions["rc"] == (4,)
    assert found.label_values == (0, 1, 2, 3, 4) and spec.label_kind == "brats2023"  # spec itself unchanged
    assert data.main(["check", "--data", str(root)]) == 0
    err = capsys.readouterr().err
    assert "labels brats2024 recognised from label 4" in err and "0 problem(s)" in err
    assert data.main(["check", "--data", str(root), "--labels", "brats2023"]) == 1
    out, err = capsys.readouterr()
    assert out.strip().splitlines() == [l for l in out.strip().splitlines() if "case_01-seg.nii.gz" in l]
    assert "label values [4] outside the brats2023 set" in out and "labels brats2023 (" in err
    plain = tmp_path / "brats2023"
    make_brats(plain, n=2, style="2023")
    problems, found = data.check_dataset(layouts.resolve(plain))
    assert problems == [] and found.label_kind == "brats2023"
    # a BraTS 2021 set with a stray 3 is not "recognised" as anything: the 3 stays a problem
    old = tmp_path / "brats2021"
    make_brats(old, n=1)
    seg = old / "case_00" / "case_00_seg.nii.gz"
    a = np.asanyarray(nib.load(str(seg)).dataobj).copy()
    a[:1] = 3
    save(seg, a)
    problems, found = data.check_dataset(layouts.resolve(old))
    assert len(problems) == 1 and "[3]" in problems[0] and found.label_kind == "brats"


def test_nnunet_duplicate_channel_names_fail(tmp_path):
    make_nnunet(tmp_path / "nn")
    meta = json.loads((tmp_path / "nn" / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "CT"}
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dataset.json: channel names \['CT', 'CT'\] repeat \['ct'\]"):
        layouts.resolve(tmp_path / "nn")


def test_label_tables_of_dataset_json(tmp_path):
    # nnU-Net v2 region-based BraTS (labels converted to 1 edema, 2 core, 3 enhancing)
    kind, values, regions = layouts._labels_from_json(
        {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}, "x")
    assert values == (0, 1, 2, 3) and regions == {"tc": (2, 3), "wt": (1, 2, 3), "et": (3,)}
    # MSD Task01 (v1 table): 1 edema, 2 non-enhancing, 3 enhancing
    kind, values, regions = layouts._labels_from_json(
        {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}, "x")
    assert kind == "custom" and regions == {"tc": (2, 3), "wt": (2, 1, 3), "et": (3,)}
    # single-file datalist entries keep their full names as case ids
    for i in range(2):
        save(tmp_path / "imagesTr" / f"BRATS_{i:03d}.nii.gz", np.ones(SHAPE, np.int16))
    entries = [{"image": f"imagesTr/BRATS_{i:03d}.nii.gz"} for i in range(2)]
    (tmp_path / "list.json").write_text(json.dumps({"training": entries}))
    spec = layouts.resolve(tmp_path / "list.json")
    assert [c.id for c in spec.cases] == ["BRATS_000", "BRATS_001"] and spec.modalities == ["ch0"]


# ---------------------------------------------------------------------------------------------
# Splits and contract


def test_split_deterministic_and_file(tmp_path):
    spec = layouts.DatasetSpec(tmp_path, "brats", ["t1"], [layouts.Case(f"c{i:02d}", {}) for i in range(20)], "brats")
    a = data.make_split(spec, seed=0)
    assert a == data.make_split(spec, seed=0) and a != data.make_split(spec, seed=1)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (12, 4, 4)
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(c.id for c in spec.cases)
    path = tmp_path / "split.json"
    assert data.make_split(spec, seed=0, path=path) == a
    assert json.loads(path.read_text())["seed"] == 0
    spec.cases.reverse()  # order of discovery does not matter; the file is the source of truth
    assert data.make_split(spec, seed=0, path=path) == a
    with pytest.raises(ValueError, match="made with seed 0"):
        data.make_split(spec, seed=3, path=path)
    with pytest.raises(ValueError, match="cannot split 2 cases"):
        two = layouts.DatasetSpec(tmp_path, "x", [], [layouts.Case("a", {}), layouts.Case("b", {})], None)
        data.make_split(two, val=0.5, test=0.5)


def test_contract(folders):
    base, _ = folders
    a = data.contract(layouts.resolve(base / "permuted"))
    assert a["modalities"] == ["t1", "t1ce", "t2", "flair"] and a["orientation"] == "RAS"
    assert a["spacing"] == [1.5, 1.2, 0.9]  # voxel axes 2, 0, 1 point to R, A, S
    b = data.contract(layouts.resolve(base / "brats", "flair,t1,t1ce,t2"))
    diff = data.compare_contract(a, b)
    assert any(d.startswith("modalities") for d in diff) and any(d.startswith("spacing") for d in diff)
    assert data.compare_contract(b, b) == []
    c = data.contract(layouts.resolve(base / "autopet"))
    assert c["normalisation"]["pet"] == {"kind": "suv_scale", "scale": 10.0, "clip_low": 0.0}


# ---------------------------------------------------------------------------------------------
# Demo data


def test_demo_data_set(tmp_path):
    root = layouts.ensure_demo(seed=0, n_persons=4, spacing=4.0, root=tmp_path / "demo")
    assert "nilearn" not in sys.modules  # its files are used, the package is never imported
    manifest = json.loads((root / "manifest.json").read_text())
    built = (root / "manifest.json").stat().st_mtime_ns
    assert layouts.ensure_demo(seed=0, n_persons=4, spacing=4.0, root=root) == root
    assert (root / "manifest.json").stat().st_mtime_ns == built  # same settings: not rebuilt
    mri = layouts.resolve(root / "brats")
    pet = layouts.resolve(root / "autopet")
    assert [c.id for c in mri.cases] == [c.id for c in pet.cases] == [p["id"] for p in manifest["persons"]]
    assert data.check_dataset(mri)[0] == [] and data.check_dataset(pet)[0] == []
    tumours = [p["tumour"] for p in manifest["persons"]]
    assert sum(tumours) == 3
    brains = []
    for person, c_mri, c_pet in zip(manifest["persons"], mri.cases, pet.cases):
        imgs = [nib.load(str(p)) for p in [*c_mri.images.values(), c_mri.label, *c_pet.images.values(), c_pet.label]]
        for img in imgs:  # every modality of a person, MRI and PET/CT, on one grid
            assert img.shape == imgs[0].shape and np.allclose(img.affine, imgs[0].affine)
        t1, t1ce, t2, flair, seg, ct, suv, lesion = [np.asanyarray(i.dataobj) for i in imgs]
        brain = t1 != 0
        assert all(np.array_equal(brain, a != 0) for a in (t1ce, t2, flair))
        assert (ct[brain] > -200).all() and (ct[~brain] < -500).any()  # CT body covers the MRI brain
        assert np.array_equal(lesion, np.isin(seg, (1, 4)).astype(np.uint8))
        if person["tumour"]:
            assert set(np.unique(seg)) == {0, 1, 2, 4}
            rim, oed, normal = seg == 4, seg == 2, brain & (seg == 0)
            rel = lambda a, m: a[m].mean() / a[normal].mean()  # noqa: E731
            assert rel(t1ce, rim) > 1.3 * rel(t1, rim)  # gadolinium enhancement of the rim
            assert rel(t2, oed) > 1.2 and rel(flair, oed) > 1.2  # oedema bright on T2 and FLAIR
            assert suv[rim].mean() > 1.2 * suv[normal].mean() and suv[seg == 1].mean() < suv[rim].mean()
        else:
            assert not seg.any()
        brains.append(brain)
    for a, b in itertools.combinations(brains, 2):  # personal anatomy: brain masks differ
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) < 0.97
    # deterministic by seed: the generator reproduces a stored person
    template, origin, tsp, tshape = demo_data.load_template(4.0)
    arrays, _ = demo_data.make_person(1, 0, tumours[1], template, origin, tsp, tshape, 4.0)
    seg1 = np.asanyarray(nib.load(str(mri.cases[1].label)).dataobj)
    assert np.array_equal(demo_data.lps(arrays["seg"], arrays["first"], 4.0)[0], seg1)
    vol = data.load_case(mri.cases[1], mri, tmp_path / "cache")
    assert all(n <= 96 for n in vol.image.shape[1:])
