"""Data: reading and checking the files of a case, preprocessing with an exact inverse, a
cache of preprocessed cases (its file format: cache.py), label maps and regions, split files and the data contract stored in
checkpoints. Which files make the cases of a data set is layouts.py; what training draws from the
cached cases (random roi crops, the transforms Phi and Augment) is sampling.py.

Preprocessing of a case (all steps recorded, restore() inverts them voxel-exactly):
    1. reorient to RAS with axis permutations and flips only (no resampling);
    2. crop to the bounding box of the foreground: the brain (any modality nonzero) for MRI, the
       body (CT > -500 HU, holes filled per axial slice) for CT/PET;
    3. normalise: MRI z-score over each modality's nonzero voxels (background stays 0); CT
       clipped to [-1000, 1000] HU and scaled to [-1, 1]; PET in SUV, negatives set to 0, divided
       by 10, never clipped at the top (that would erase the hottest lesions).
Arrays are (C, x, y, z) with the spatial axes pointing to R, A, S; the code calls them (C, D, H, W).

    python data.py check --data PATH [--modalities t1,t2] [--labels brats2024]   # every problem, one line each
    python data.py prepare --data PATH [--workers 8] [--format b2nd]  # fill the cache before a long run
    torchrun --nnodes N --nproc-per-node 1 data.py prepare --data PATH --cache SHARED  # nodes share the cases
    python data.py split --data PATH --seed 0 --out split.json
    python data.py demo [--persons 32 --seed 0 --spacing 2]
"""
import argparse
import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
from einops import rearrange

import cache
from files import atomic, atomic_dir, json_text, locked, write_json
from layouts import ensure_demo, read_json, resolve, with_labels
from metrics import LABELS  # label kind -> (allowed values, regions: name -> label values, in channel order)

HERE = Path(__file__).resolve().parent
CACHE_DIR = HERE / ".cache" / "data"
VERSION = 1  # of the preprocessing: cache entries of another version are rebuilt
CT_WINDOW = (-1000.0, 1000.0)  # HU, mapped to [-1, 1]
CT_BODY_HU = -500.0  # body mask threshold (air is -1000)
PET_SCALE = 10.0  # SUV per normalised unit
PET_BODY_SUV = 0.1


def normalisation(modality):
    """How one modality is normalised (stored in records and in the data contract)."""
    if modality == "ct":
        return {"kind": "ct_window", "low": CT_WINDOW[0], "high": CT_WINDOW[1], "out": [-1.0, 1.0]}
    if modality == "pet":
        return {"kind": "suv_scale", "scale": PET_SCALE, "clip_low": 0.0}
    return {"kind": "zscore_nonzero"}


def pad_value(modality):
    """Normalised value of empty space: air for CT, 0 otherwise."""
    return -1.0 if modality == "ct" else 0.0


def empty_value(modality):
    """Value of empty space in the modality's own unit: air (-1000 HU) for CT, 0 otherwise."""
    return CT_WINDOW[0] if modality == "ct" else 0.0


def denormalise(a, modality):
    """Normalised values -> the modality's unit, the inverse of the normalisation on its range:
    CT clipped to [-1, 1] and mapped back to HU in the window, PET times the SUV scale
    (negatives set to 0), MRI unchanged (z-scores: MRI has no absolute unit). float32."""
    a = np.asarray(a, dtype=np.float32)
    norm = normalisation(modality)
    if norm["kind"] == "ct_window":
        lo, hi = norm["low"], norm["high"]
        return ((np.clip(a, -1.0, 1.0) + 1.0) * np.float32((hi - lo) / 2.0) + np.float32(lo)).astype(np.float32)
    if norm["kind"] == "suv_scale":
        return (np.maximum(a, 0) * np.float32(norm["scale"])).astype(np.float32)
    return a.copy()


# ---------------------------------------------------------------------------------------------
# Reading and checking


def _read_checked(case, spec, first_only):
    """Reads a case and checks it. Returns (problems, arrays, header image); with first_only the
    first problem is raised instead (FileNotFoundError for a missing file, else ValueError)."""
    problems = []

    def fail(msg, exc=ValueError):
        if first_only:
            raise exc(msg)
        problems.append(msg)

    files = list(case.images.items()) + ([("label", case.label)] if case.label is not None else [])
    imgs, ref = {}, None
    for name, path in files:
        path = Path(path)
        if not path.exists():
            what = "label" if name == "label" else f"modality {name}"
            fail(f"{path}: missing file ({what} of case {case.id})", FileNotFoundError)
            continue
        try:
            img = nib.load(str(path))
        except Exception as e:  # nibabel raises many kinds for a bad header
            fail(f"{path}: not a readable NIfTI file ({_one_line(e)})")
            continue
        shape = img.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            fail(f"{path}: {len(shape)}-D image of shape {tuple(shape)}, expected 3-D (one file per modality)")
            continue
        aff = img.affine
        if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-8:
            fail(f"{path}: degenerate affine {aff[:3].tolist()}")
            continue
        if ref is None:
            ref = (path, shape, aff)
        elif shape != ref[1]:
            fail(f"{path}: shape {tuple(shape)} differs from {tuple(ref[1])} of {ref[0]} (one grid per case)")
            continue
        elif not np.allclose(aff, ref[2], atol=1e-3):
            fail(f"{path}: affine differs from {ref[0]}'s (max difference {np.abs(aff - ref[2]).max():.3g}; one grid "
                 "per case)")
            continue
        imgs[name] = (path, img)
    if problems or len(imgs) < len(files):
        return problems, None, None

    arrays = {}
    for name, (path, img) in imgs.items():
        try:
            a = np.asanyarray(img.dataobj).reshape(img.shape[:3])
        except (EOFError, OSError, zlib.error, ValueError) as e:
            fail(f"{path}: cannot read the voxels, corrupt or truncated gzip? ({_one_line(e)})")
            continue
        if a.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(a)))
            if bad:
                fail(f"{path}: {bad} NaN/Inf voxels")
                continue
        arrays[name] = a
    if problems:
        return problems, None, None
    if "label" in arrays:
        lab = arrays["label"]
        if lab.dtype.kind == "f" and not np.array_equal(lab, np.round(lab)):
            fail(f"{case.label}: non-integer label values")
        else:
            present = _values(lab)
            allowed = spec.label_values
            extra = [int(v) for v in present if allowed is not None and v not in allowed]
            if extra:
                hint = ""
                if spec.label_kind == "brats" and 3 in extra:
                    hint = "; 3 is ET in BraTS 2023: name the files -t1n/-t1c/-t2w/-t2f/-seg"
                if spec.label_kind == "brats2023" and 4 in extra:
                    hint = ("; 4 is ET in BraTS 2018-2021 (name the files _t1/_t1ce/_t2/_flair/_seg) and the "
                            "resection cavity in BraTS 2024 (--labels brats2024)")
                fail(f"{case.label}: label values {extra} outside the {spec.label_kind} set {list(allowed)}{hint}")
            elif present.min() < 0 or present.max() > 255:
                fail(f"{case.label}: label values outside 0..255")
    if "pet" in arrays:
        pet = arrays["pet"]
        body = pet[pet > PET_BODY_SUV]
        med = float(np.median(body)) if body.size else 0.0
        if med > 100:
            fail(f"{case.images['pet']}: PET median {med:.0f} over the body looks like activity (Bq/ml), not SUV")
    if "ct" in arrays and float(arrays["ct"].min()) > -200:
        fail(f"{case.images['ct']}: CT minimum {float(arrays['ct'].min()):.0f} has no air: expected HU (air -1000)")
    return problems, arrays, imgs[files[0][0]][1]


def _one_line(e):
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def _values(a):
    """Sorted distinct values of an integer-valued array (a histogram when the range is small)."""
    if a.dtype.kind in "iub" and a.size:
        lo, hi = int(a.min()), int(a.max())
        if hi - lo < 1 << 16:
            flat = a.ravel(order="K")
            return np.flatnonzero(np.bincount(flat - lo if lo else flat)) + lo
    return np.unique(a).astype(np.int64)


def check_case(case, spec):
    """Every problem of one case, one line each (empty when the case is usable), and the label
    values the case holds (None without a readable label)."""
    problems, arrays, _ = _read_checked(case, spec, first_only=False)
    if arrays is not None and not problems and not _foreground({m: arrays[m] for m in case.images}).any():
        problems.append(f"{next(iter(case.images.values()))}: no foreground (the image is empty or has no body)")
    present = _values(arrays["label"]) if arrays is not None and "label" in arrays else None
    return problems, present


def check_dataset(spec, recognise=True):
    """Every problem of a dataset, one line each: missing or unreadable files, shape or affine
    mismatches, NaN/Inf, wrong dimensionality, label values outside the set, empty foreground.
    Returns (problems, spec). recognise: BraTS 2023 file names whose labels hold a 4 can only be
    BraTS 2024 (BraTS 2023 has no label 4), so the returned spec then has the brats2024
    convention; recognise=False (a convention the user forced) checks against spec's own."""
    if not spec.cases:
        return [f"{spec.root}: no cases"], spec
    probe = recognise and spec.label_kind == "brats2023"
    checked = with_labels(spec, "brats2024") if probe else spec  # 4 allowed while reading
    problems, with4 = [], 0
    ids = [c.id for c in spec.cases]
    for cid in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{spec.root}: case id {cid!r} appears more than once")
    with_label = sum(c.label is not None for c in spec.cases)
    for c in spec.cases:
        if 0 < with_label < len(spec.cases) and c.label is None:
            first = next(iter(c.images.values()))
            problems.append(f"{first.parent}: case {c.id} has no label file, other cases have one")
        found, present = check_case(c, checked)
        problems += found
        with4 += present is not None and 4 in present
    return problems, checked if with4 else spec


# ---------------------------------------------------------------------------------------------
# Preprocessing and its inverse


def orientation(affine):
    """Axis permutation and flips that bring voxel axes to RAS: canonical axis j is source axis
    perm[j], reversed when flip[j]."""
    ornt = nib.orientations.io_orientation(affine)  # per source axis: (canonical axis, +1/-1)
    perm = [int(np.flatnonzero(ornt[:, 0] == j)[0]) for j in range(3)]
    flip = [bool(ornt[perm[j], 1] < 0) for j in range(3)]
    return perm, flip


def to_canonical(a, perm, flip):
    """View of a (..., X, Y, Z) array in canonical (RAS) axis order."""
    lead = a.ndim - 3
    a = np.transpose(a, list(range(lead)) + [lead + p for p in perm])
    return a[(Ellipsis, *[slice(None, None, -1) if f else slice(None) for f in flip])]


def from_canonical(a, perm, flip):
    """Inverse of to_canonical."""
    lead = a.ndim - 3
    a = a[(Ellipsis, *[slice(None, None, -1) if f else slice(None) for f in flip])]
    return np.transpose(a, list(range(lead)) + [lead + p for p in np.argsort(perm)])


def _fill_axial(mask):
    """Fills holes (lungs, sinuses) of a body mask: a voxel enclosed by the body along both
    in-plane axes of its axial slice belongs to the body."""
    acc = np.logical_or.accumulate
    along_x = acc(mask, axis=0) & acc(mask[::-1], axis=0)[::-1]
    along_y = acc(mask, axis=1) & acc(mask[:, ::-1], axis=1)[:, ::-1]
    return mask | (along_x & along_y)


def _foreground(canon):
    """Foreground mask from canonical arrays {modality: array}."""
    fg = None
    if "ct" in canon:
        fg = _fill_axial(canon["ct"] > CT_BODY_HU)
    elif "pet" in canon:
        fg = _fill_axial(canon["pet"] > PET_BODY_SUV)
    for m, a in canon.items():
        if m not in ("ct", "pet"):
            fg = (a != 0) if fg is None else fg | (a != 0)
    return fg


def _normalise(a, modality, out):
    """Writes the normalised float32 values of one cropped modality into out; returns the
    normalisation with the statistics used."""
    out[...] = a
    norm = normalisation(modality)
    if norm["kind"] == "ct_window":
        lo, hi = norm["low"], norm["high"]
        np.clip(out, lo, hi, out=out)
        out -= lo
        out *= 2.0 / (hi - lo)
        out -= 1.0
    elif norm["kind"] == "suv_scale":
        np.maximum(out, 0, out=out)
        out *= 1.0 / norm["scale"]
    else:
        nz = out != 0
        vals = out[nz]
        mean = float(vals.mean(dtype=np.float64)) if vals.size else 0.0
        std = float(vals.std(dtype=np.float64)) if vals.size else 1.0
        std = std if std > 0 else 1.0
        out[nz] = (vals - np.float32(mean)) / np.float32(std)
        norm = {**norm, "mean": mean, "std": std}
    return norm


def _preprocess(case, spec, arrays, img, pad_to=None):
    """Reorient, crop to the foreground, normalise. Returns (image, fg, label, record)."""
    ref = next(iter(case.images.values()))
    if img is None:
        img = nib.load(str(ref))
    affine = img.affine
    perm, flip = orientation(affine)
    canon = {m: to_canonical(arrays[m], perm, flip) for m in case.images}
    fg = _foreground(canon)
    if not fg.any():
        raise ValueError(f"{ref}: no foreground (the image is empty or has no body)")
    box = []
    for axis in range(3):
        hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1])
    sl = tuple(slice(a, b) for a, b in box)
    image = np.empty((len(case.images), *[b - a for a, b in box]), np.float32)  # (C, D, H, W)
    norms = [{"modality": m, **_normalise(canon[m][sl], m, image[c])} for c, m in enumerate(case.images)]
    fg = np.ascontiguousarray(fg[sl])
    label = None
    if "label" in arrays:
        label = np.ascontiguousarray(to_canonical(arrays["label"], perm, flip)[sl]).astype(np.uint8)
    pad = [[0, 0]] * 3
    if pad_to is not None:
        want = [pad_to] * 3 if np.isscalar(pad_to) else list(pad_to)
        pad = [[max(0, w - n) // 2, max(0, w - n) - max(0, w - n) // 2] for w, n in zip(want, fg.shape)]
        if any(sum(p) for p in pad):
            image = np.stack([np.pad(c, pad, constant_values=pad_value(m)) for c, m in zip(image, case.images)])
            fg = np.pad(fg, pad)
            label = None if label is None else np.pad(label, pad)
    canon_shape = [int(img.shape[p]) for p in perm]
    to_src = np.zeros((4, 4))  # canonical voxel -> source voxel
    for j in range(3):
        to_src[perm[j], j] = -1.0 if flip[j] else 1.0
        to_src[perm[j], 3] = canon_shape[j] - 1 if flip[j] else 0.0
    to_src[3, 3] = 1.0
    shift = np.eye(4)
    shift[:3, 3] = [b[0] - p[0] for b, p in zip(box, pad)]
    header = img.header
    record = {
        "version": VERSION,
        "id": case.id,
        "source": str(ref),
        "shape": [int(n) for n in img.shape[:3]],
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
        "header": base64.b64encode(header.binaryblock).decode(),
        "header_class": type(header).__name__,
        "orientation": "RAS",
        "perm": perm,
        "flip": flip,
        "canonical_shape": canon_shape,
        "box": box,
        "pad": pad,
        "shape_out": [int(n) for n in fg.shape],
        "affine_out": (np.asarray(affine, dtype=np.float64) @ to_src @ shift).tolist(),
        "spacing": [float(header.get_zooms()[p]) for p in perm],
        "modalities": list(case.images),
        "normalisation": norms,
        "pad_value": [pad_value(m) for m in case.images],
    }
    return image, fg, label, record


def restore(array, record, fill=0):
    """Array in the preprocessed grid (..., D, H, W) -> the original image grid (..., X, Y, Z):
    undoes padding, crop and reorientation exactly; voxels outside the crop get `fill`."""
    a = np.asarray(array)
    if list(a.shape[-3:]) != record["shape_out"]:
        raise ValueError(f"restore: array shape {tuple(a.shape[-3:])} is not the preprocessed shape "
                         f"{tuple(record['shape_out'])} of case {record['id']}")
    a = a[(Ellipsis, *[slice(p0, n - p1) for (p0, p1), n in zip(record["pad"], a.shape[-3:])])]
    out = np.full(a.shape[:-3] + tuple(record["canonical_shape"]), fill, dtype=a.dtype)
    out[(Ellipsis, *[slice(b0, b1) for b0, b1 in record["box"]])] = a
    return np.ascontiguousarray(from_canonical(out, record["perm"], record["flip"]))


def write_nifti(array, record, path, grid="preprocessed"):
    """Writes an array (labels, probabilities, a synthesised modality) as NIfTI with the source's
    affine and header. grid="preprocessed": restored first; "original": already in that grid.
    A leading channel axis is written as the 4th NIfTI dimension. Atomic (files.atomic)."""
    if grid not in ("preprocessed", "original"):
        raise ValueError(f"write_nifti: grid must be 'preprocessed' or 'original', got {grid!r}")
    a = restore(array, record) if grid == "preprocessed" else np.asarray(array)
    if list(a.shape[-3:]) != record["shape"] or a.ndim not in (3, 4):
        raise ValueError(f"write_nifti: shape {a.shape} does not fit the source grid {tuple(record['shape'])}")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    elif a.dtype == np.float64:
        a = a.astype(np.float32)
    if a.ndim == 4:
        a = rearrange(a, "c x y z -> x y z c")  # NIfTI keeps channels in the 4th dimension
    cls = nib.Nifti2Header if record["header_class"] == "Nifti2Header" else nib.Nifti1Header
    header = cls(binaryblock=base64.b64decode(record["header"]))
    img = (nib.Nifti2Image if cls is nib.Nifti2Header else nib.Nifti1Image)(a, np.array(record["affine"]), header)
    img.set_data_dtype(a.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    path = Path(path)
    with atomic(path) as tmp:
        nib.save(img, str(tmp))
    return path


def label_to_regions(label, regions):
    """Raw labels (..., D, H, W) -> float32 region channels (K, ..., D, H, W); a region with
    values None is 'any nonzero label'."""
    out = [(label > 0) if v is None else np.isin(label, v) for v in regions.values()]
    return np.stack(out).astype(np.float32)


def regions_to_label(masks, regions):
    """Region masks (K, D, H, W) in the channel order of `regions` (name -> label values, as
    the specs hold them) -> a uint8 label map in the dataset's convention. Each region paints
    the one value it holds that no region nested in it holds, outer regions first: BraTS
    WT - TC -> 2, TC - ET -> 1, ET -> 4 (3 for BraTS 2023); AutoPET lesion -> 1."""
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


def source_spacing(record):
    """Voxel spacing (mm) along the source image's own axes (the record lists it in RAS order)."""
    out = [0.0] * 3
    for j, p in enumerate(record["perm"]):
        out[p] = float(record["spacing"][j])
    return out


# ---------------------------------------------------------------------------------------------
# Cache and volumes


@dataclass
class Volume:
    id: str
    # numpy arrays, or their cache.read() stand-ins (memory maps, cache.Stored) that a crop slices
    image: np.ndarray  # (C, D, H, W) float32, normalised
    fg: np.ndarray  # (D, H, W) bool, brain/body mask
    label: np.ndarray | None  # (D, H, W) uint8, raw dataset labels
    record: dict
    region_values: dict  # region name -> label values, in channel order
    entry: Path | None = None  # cache folder the arrays are mapped from

    @cached_property
    def regions(self):
        """(K, D, H, W) float32 region channels (BraTS: TC, WT, ET; AutoPET: lesion) or None."""
        return None if self.label is None else label_to_regions(self.label, self.region_values)

    def __getstate__(self):
        # mapped volumes travel to DataLoader workers as their cache path, not as a copy
        state = {k: v for k, v in self.__dict__.items() if k != "regions"}
        if self.entry is not None:
            state.update(image=None, fg=None, label=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.entry is not None:
            self.image, self.fg, self.label = cache.read(self.entry, self.record)


def _sources(case):
    files = list(case.images.values()) + ([case.label] if case.label is not None else [])
    out = {}
    for p in files:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: missing file (case {case.id})") from None
        out[str(Path(p).resolve())] = [st.st_size, st.st_mtime_ns]
    return out


def _entry_name(case, pad_to):
    key = json.dumps({"version": VERSION, "images": [[m, str(Path(p).resolve())] for m, p in case.images.items()],
                      "label": str(Path(case.label).resolve()) if case.label else None,
                      "norm": [normalisation(m) for m in case.images], "pad_to": pad_to}, sort_keys=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case.id)[:60]
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def _open_entry(entry, case, spec, sources, fmt=None):
    """The cached volume, or None when missing, built from other source files or (fmt given)
    stored in another format."""
    try:
        record = json.loads((entry / "record.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("sources") != sources or record.get("version") != VERSION:
        return None
    if fmt is not None and record.get("format", "npy") != fmt:
        return None
    image, fg, label = cache.read(entry, record)
    return Volume(case.id, image, fg, label, record, dict(spec.regions), entry)



def load_case(case, spec, cache_dir=None, use_cache=True, pad_to=None, fmt=None):
    """Reads, checks and preprocesses one case -> Volume. With the cache (default CACHE_DIR)
    a case is decoded once into an entry of cache.py's format and later read from it (an entry
    of either format is used; fmt names the one to build, default cache.DEFAULT, and when given
    rebuilds entries of the other); an entry is rebuilt when a source file changes (size or
    mtime), written in a temp folder and renamed so an interrupted build leaves nothing
    half-written, and built under a file lock so ranks and workers sharing the folder build it
    once. pad_to pads the crop to at least that size."""
    if not use_cache:
        problems, arrays, img = _read_checked(case, spec, first_only=True)
        image, fg, label, record = _preprocess(case, spec, arrays, img, pad_to)
        return Volume(case.id, image, fg, label, record, dict(spec.regions))
    return _cached(case, spec, cache_dir, pad_to, fmt)[0]


def _cached(case, spec, cache_dir, pad_to, fmt, wait=True):
    """load_case with the cache: (Volume, whether this call built its entry); with wait=False,
    (None, False) when another process holds the entry's lock (it is building it)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    entry = cache_dir / _entry_name(case, pad_to)
    sources = _sources(case)
    vol = _open_entry(entry, case, spec, sources, fmt)
    if vol is not None:
        return vol, False
    with locked(cache_dir / (entry.name + ".lock"), wait) as held:
        if not held:
            return None, False
        vol = _open_entry(entry, case, spec, sources, fmt)  # another rank may have built it meanwhile
        if vol is not None:
            return vol, False
        problems, arrays, img = _read_checked(case, spec, first_only=True)
        image, fg, label, record = _preprocess(case, spec, arrays, img, pad_to)
        record["sources"] = sources
        with atomic_dir(entry) as tmp:  # a stale entry is moved aside: readers keep their open maps
            record.update(cache.write(tmp, image, fg, label, fmt or cache.DEFAULT))
            (tmp / "record.json").write_text(json_text(record, indent=None))
    return _open_entry(entry, case, spec, sources, fmt), True


def _build(case, spec, cache_dir, fmt, wait):
    """One case of prepare(): (case, bytes, whether this call built it), bytes None when
    another process is building it (wait=False)."""
    vol, built = _cached(case, spec, cache_dir, None, fmt, wait)
    return case, None if vol is None else sum(p.stat().st_size for p in vol.entry.iterdir()), built


def prepare(spec, cache_dir=None, rank=0, world=1, workers=1, fmt=None, progress=False):
    """Builds the cache entries of every case (this rank's share: case i when i % world == rank)
    over `workers` processes. Entries already there are kept, so a prepare that was stopped goes
    on where it was; ranks or processes on other nodes sharing the folder build each entry once
    (load_case's lock): a case another process is building is passed over and waited for at the
    end, so two prepares of one set share the work. Returns (entries built, entries kept, bytes
    of this share)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm import tqdm

    todo = [c for i, c in enumerate(spec.cases) if i % world == rank]
    bar = tqdm(total=len(todo), desc="prepare", unit="case", dynamic_ncols=True, disable=not progress)
    built = kept = size = 0
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=get_context("spawn"))) if workers > 1 else None
        for wait in (False, True):
            args = [(c, spec, cache_dir, fmt, wait) for c in todo]
            results = pool.map(_build, *zip(*args)) if pool and args else (_build(*a) for a in args)
            todo = []
            for case, nbytes, new in results:
                if nbytes is None:
                    todo.append(case)
                    continue
                built, kept, size = built + new, kept + (not new), size + nbytes
                bar.update()
    bar.close()
    return built, kept, size


# ---------------------------------------------------------------------------------------------
# Splits and the data contract


def make_split(spec, seed=0, val=0.2, test=0.2, path=None):
    """Deterministic train/val/test split of the case ids by seed. With `path`, an existing split
    file is read (and checked against the dataset), else the new split is written there, so
    every script and rank uses the same split."""
    ids = sorted(c.id for c in spec.cases)
    if path is not None and Path(path).exists():
        saved = read_json(path)
        if any(k not in saved for k in ("train", "val", "test")):
            raise ValueError(f"{path}: a split file needs 'train', 'val' and 'test' lists")
        unknown = sorted(set(itertools.chain(saved["train"], saved["val"], saved["test"])) - set(ids))
        if unknown:
            raise ValueError(f"{path}: case ids not in {spec.root}: {', '.join(unknown[:5])}")
        if saved.get("seed", seed) != seed:
            raise ValueError(f"{path}: made with seed {saved['seed']}, asked for seed {seed}: "
                             "delete the file or use its seed")
        return {k: list(saved[k]) for k in ("train", "val", "test")}
    n = len(ids)
    n_test, n_val = int(round(test * n)), int(round(val * n))
    if n - n_test - n_val < 1 or min(val, test) < 0:
        raise ValueError(f"{spec.root}: cannot split {n} cases into val {val} and test {test} with a train part left")
    order = np.random.default_rng(seed).permutation(n)
    split = {"train": sorted(ids[i] for i in order[n_test + n_val:]),
             "val": sorted(ids[i] for i in order[n_test:n_test + n_val]),
             "test": sorted(ids[i] for i in order[:n_test])}
    if path is not None:
        content = {"dataset": str(spec.root), "seed": seed, "val_fraction": val, "test_fraction": test, **split}
        write_json(path, content)
    return split


def contract(spec):
    """What a model trained on this data assumes: stored in checkpoints, compared when reused."""
    spacing = None
    if spec.cases:
        first = next(iter(spec.cases[0].images.values()))
        if Path(first).exists():
            img = nib.load(str(first))
            perm, _ = orientation(img.affine)
            spacing = [round(float(img.header.get_zooms()[p]), 4) for p in perm]
    return {
        "version": VERSION,
        "layout": spec.layout,
        "modalities": list(spec.modalities),
        "normalisation": {m: normalisation(m) for m in spec.modalities},
        "axis_order": "C,x,y,z (voxel axes towards R,A,S)",
        "orientation": "RAS",
        "crop": "foreground bounding box",
        "spacing": spacing,
        "label_kind": spec.label_kind,
        "regions": list(spec.regions),
    }


def compare_contract(saved, current, spacing_tol=0.05):
    """Differences between two contracts that change what a model sees, one line each."""
    out = []
    for key in ("modalities", "normalisation", "axis_order", "orientation", "crop"):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: checkpoint {saved.get(key)} != data {current.get(key)}")
    a, b = saved.get("spacing"), current.get("spacing")
    if a and b and any(abs(x - y) > spacing_tol * max(x, y) for x, y in zip(a, b)):
        out.append(f"spacing: checkpoint {a} mm != data {b} mm")
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["check", "prepare", "split", "demo"])
    ap.add_argument("--data", default="demo", help="dataset folder, datalist .json, demo or demo-petct")
    ap.add_argument("--modalities", default=None, help="subset in channel order, e.g. t1,t2")
    ap.add_argument("--labels", default=None, choices=sorted(LABELS),
                    help="label convention (default: the layout's; check takes brats2024 for BraTS 2023 names with a label 4)")
    ap.add_argument("--cache", default=None, help=f"cache folder (default {CACHE_DIR})")
    ap.add_argument("--format", default=None, choices=cache.FORMATS,
                    help=f"prepare: entries of this format (default {cache.DEFAULT}; given, entries of the other are rebuilt)")
    ap.add_argument("--workers", type=int, default=1, help="prepare: processes building entries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val", type=float, default=0.2)
    ap.add_argument("--test", type=float, default=0.2)
    ap.add_argument("--out", default=None, help="split file to write (split)")
    ap.add_argument("--persons", type=int, default=32)
    ap.add_argument("--spacing", type=float, default=2.0)
    args = ap.parse_args(argv)
    if args.command == "demo":
        print(ensure_demo(args.seed, args.persons, args.spacing))
        return 0
    try:
        spec = resolve(args.data, args.modalities, args.labels)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.command == "check":
        problems, found = check_dataset(spec, recognise=not args.labels)
        for p in problems:
            print(p)
        why = (" recognised from label 4, which BraTS 2023 does not have (--labels brats2023 to check as BraTS 2023)"
               if found.label_kind != spec.label_kind else "")
        print(f"{spec.root}: {spec.layout}, {len(spec.cases)} cases, modalities {','.join(spec.modalities)}, "
              f"labels {found.label_kind}{why} ({', '.join(f'{k}={list(v)}' for k, v in found.regions.items() if v)}): "
              f"{len(problems)} problem(s)", file=sys.stderr)
        return 1 if problems else 0
    if args.command == "prepare":
        t = time.perf_counter()
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
        try:
            built, kept, size = prepare(spec, args.cache, rank, world, args.workers, args.format, progress=rank == 0)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        share = f"rank {rank} of {world}: " if world > 1 else ""
        print(f"{share}cached {built + kept} cases of {spec.root} in {args.cache or CACHE_DIR}: {built} built, {kept} "
              f"already there, {size / 2**20:.1f} MB, {time.perf_counter() - t:.1f} s")
        return 0
    split = make_split(spec, args.seed, args.val, args.test, args.out)
    print(json.dumps({k: len(v) for k, v in split.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
