"""`python bench.py data`: the data layer at the size of the real data sets, in one run.

1. Load + preprocess BraTS-sized cases: ours (gzip -> cache, and the cache read back) against
   MONAI's LoadImaged / NormalizeIntensityd / CropForegroundd, plain and behind PersistentDataset.
2. The cache formats on a BraTS-sized case (4 x 240x240x155, 1 mm) and an AutoPET-sized study
   (CT + PET, 400x400x300): the float32 .npy memory map (cache.py's npy), float16 and int16 +
   per-channel scale memory maps (npy-int16), the background-trimmed tiles (tiles) at three tile
   sizes, and blosc2 (b2nd) with zstd, lz4 and lz4hc, several chunkings. Bytes per case, time
   to write the entry, the largest error, one random roi crop read cold (the entry's pages
   dropped from the page cache, posix_fadvise) and warm as a worker delivers it
   (sampling.crop_image: float32, or the int16 formats' int16 values and scales, dequantised
   where the step runs), and the crops per second that one DataLoader worker delivers
   (CropDataset: crop, regions, tensors).
3. The GPU's appetite: the FLOPs of one pre-training and one tuning step at the paper's size
   (F=48, roi 96^3), the step time they imply on an H100 / H200 at --mfu of the bf16 peak, and
   the DataLoader workers per GPU that feed it with the default format.

The AutoPET-sized study is built from the demo anatomy (a head CT and PET mirrored into the
whole-body grid): its size is a whole body's, its content a head's (less air than a body).
"""
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from measure import GPU_PEAK, median_time, median_times, pretrain_step_flops, print_table, tuning_step_flops

AUTOPET_GRID = (400, 400, 300)


def _brats_cases(folder, n):
    """n copies of one 1 mm demo person in the BraTS 2021 grid (240 x 240 x 155, LPS)."""
    import demo_data

    template, origin, tsp, tshape = demo_data.load_template(1.0)
    person, _ = demo_data.make_person(1, 0, True, template, origin, tsp, tshape, 1.0)
    pad = lambda a: np.pad(a.numpy()[:, :, :155], ((21, 22), (3, 4), (0, 0)))  # noqa: E731
    affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    arrays = {k: pad(v)[::-1, ::-1] for k, v in person["mri"].items()}
    arrays["seg"] = pad(person["seg"])[::-1, ::-1]
    for i in range(n):
        cid = f"BraTS2021_{i:05d}"
        (folder / cid).mkdir(parents=True)
        for k, a in arrays.items():
            demo_data.save(np.ascontiguousarray(a), affine, folder / cid / f"{cid}_{k}.nii.gz")
    return person


def _autopet_case(folder, person, patient="PETCT_000"):
    """One AutoPET-named study (CTres, SUV, SEG) of AUTOPET_GRID voxels, the demo head's CT and
    PET mirrored to fill it."""
    import demo_data

    def grow(a):
        a = np.asarray(a)
        reps = [math.ceil(g / n) for g, n in zip(AUTOPET_GRID, a.shape)]
        pad = [(0, (r - 1) * n) for r, n in zip(reps, a.shape)]
        return np.ascontiguousarray(np.pad(a, pad, mode="symmetric")[tuple(slice(0, g) for g in AUTOPET_GRID)])

    study = folder / patient / "01-01-2000-NA-PET-CT"
    study.mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    seg = grow(np.isin(person["seg"].numpy(), (1, 4)).astype(np.uint8))
    demo_data.save(grow(person["ct"].numpy()), affine, study / "CTres.nii.gz")
    demo_data.save(grow(person["suv"].numpy()), affine, study / "SUV.nii.gz", np.int16)
    demo_data.save(seg, affine, study / "SEG.nii.gz")


def _monai_pipeline(spec, tmp, n_cases, repeats):
    """Part 1: ours cold and warm against MONAI plain and PersistentDataset."""
    from monai.data import PersistentDataset
    from monai.transforms import Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd

    import data

    def ours_cold():
        cache = Path(tempfile.mkdtemp(dir=tmp))
        for c in spec.cases:
            data.load_case(c, spec, cache)
        shutil.rmtree(cache)

    warm_cache = tmp / "warm"
    for c in spec.cases:
        data.load_case(c, spec, warm_cache)

    def ours_warm():
        for c in spec.cases:
            v = data.load_case(c, spec, warm_cache)
            np.array(v.image), np.array(v.fg), np.array(v.label)  # touch every voxel

    keys = ["image", "label"]
    monai = Compose([LoadImaged(keys), EnsureChannelFirstd(keys),
                     NormalizeIntensityd("image", nonzero=True, channel_wise=True),
                     CropForegroundd(keys, source_key="image")])
    items = [{"image": [str(p) for p in c.images.values()], "label": str(c.label)} for c in spec.cases]

    def monai_plain():
        for d in items:
            monai(d)

    persistent = PersistentDataset(items, monai, cache_dir=tmp / "monai_cache")
    for i in range(len(persistent)):
        persistent[i]

    def monai_persistent():
        for i in range(len(persistent)):
            persistent[i]

    # same output check: our crop equals MONAI's (BraTS affines need no reorientation here beyond
    # flips, which the crop box absorbs), within the default format's stated error
    ref = monai(items[0])["image"].numpy()[:, ::-1, ::-1]
    ours = np.asarray(data.load_case(spec.cases[0], spec, warm_cache).image)
    same = np.allclose(ours, ref, atol=np.abs(ref).max() / 65534 + 1e-5)
    rows = []
    t_monai = median_time(monai_plain, repeats, warmup=0)
    for name, fn in [("ours, cold (gzip -> cache)", ours_cold), ("ours, warm (cache read in full)", ours_warm),
                     ("MONAI, plain", monai_plain), ("MONAI, PersistentDataset warm", monai_persistent)]:
        t = t_monai if fn is monai_plain else median_time(fn, repeats, warmup=0 if fn is ours_cold else 1)
        rows.append({"pipeline": name, "cases/s": n_cases / t, "s/case": t / n_cases, "x MONAI plain": t_monai / t})
    print_table(f"data: load + preprocess {n_cases} BraTS-sized cases (same output as MONAI: {same})",
                rows, ["pipeline", "cases/s", "s/case", "x MONAI plain"])


# ---- part 2: the cache formats ------------------------------------------------------------------


def _write_variant(folder, vol, name):
    """Writes vol's arrays in the variant `name` into folder; returns a function that opens them
    as (image, fg, label) for a crop."""
    import cache

    if name.startswith(("b2nd", "tiles")):
        rec = cache.write(folder, vol.image, vol.fg, vol.label, name.split()[0], **VARIANTS[name])
        return lambda: cache.read(folder, rec)
    if name in ("npy float32", "npy int16 + scale"):
        rec = cache.write(folder, vol.image, vol.fg, vol.label, "npy" if name == "npy float32" else "npy-int16")
        return lambda: cache.read(folder, rec)
    np.save(folder / "image.npy", vol.image.astype(np.float16))  # npy float16
    np.save(folder / "fg.npy", vol.fg)
    np.save(folder / "label.npy", vol.label)
    return lambda: tuple(np.load(folder / f"{k}.npy", mmap_mode="r") for k in ("image", "fg", "label"))


def _drop(folder):
    """Drops the files of folder from the page cache (clean pages of unmapped files)."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _crops_per_second(vol, roi, n):
    """Crops per second of one DataLoader worker (after its first crop) over CropDataset."""
    import sampling

    ds = sampling.CropDataset([vol], roi, fg_fraction=0.5, seed=0, samples_per_epoch=n + 1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t)


VARIANTS = {"npy float32": {}, "npy float16": {}, "npy int16 + scale": {},  # name -> cache.write's options
            "tiles 16x16": dict(tile=(16, 16)), "tiles 8x16": dict(tile=(8, 16)), "tiles 32x32": dict(tile=(32, 32)),
            "b2nd zstd 5, chunks 64^3, blocks 16^3": dict(codec="zstd", clevel=5, chunk=64, block=16),
            "b2nd zstd 1, chunks 32^3": dict(codec="zstd", clevel=1, chunk=32, block=32),
            "b2nd lz4 1, chunks 64^3, blocks 32^3": dict(codec="lz4", clevel=1, chunk=64, block=32),
            "b2nd lz4 1, chunks 32^3": dict(codec="lz4", clevel=1, chunk=32, block=32),
            "b2nd lz4hc 9, chunks 32^3, blocks 16^3": dict(codec="lz4hc", clevel=9, chunk=32, block=16),
            "b2nd lz4 1, chunks 32^3, blocks 8^3": dict(codec="lz4", clevel=1, chunk=32, block=8),
            "b2nd lz4 1, chunks 32^3, blocks 16^3": dict(codec="lz4", clevel=1, chunk=32, block=16)}


def _variant_of(fmt):
    """The name in VARIANTS of cache.py's format fmt (npy, npy-int16, or tiles / b2nd at cache.py's settings)."""
    import cache

    if fmt in ("npy", "npy-int16"):
        return {"npy": "npy float32", "npy-int16": "npy int16 + scale"}[fmt]
    settings = {"tiles": dict(tile=cache.TILE),
                "b2nd": dict(codec=cache.CODEC, clevel=cache.CLEVEL, chunk=cache.CHUNK, block=cache.BLOCK)}[fmt]
    return next(n for n, o in VARIANTS.items() if n.startswith(fmt) and o == settings)


def _formats(tmp, spec, kind, roi, n_crops, n_loader):
    import data
    import sampling

    vol = data.load_case(spec.cases[0], spec, use_cache=False)
    shape = vol.image.shape
    rng = np.random.default_rng(0)
    starts = [[int(rng.integers(0, max(n - r, 0) + 1)) for n, r in zip(shape[1:], roi)] for _ in range(n_crops)]
    fill = np.asarray(vol.record["pad_value"], np.float32)

    def crop(image, s):  # what a worker delivers: float32, or int16 and its scales
        return sampling.crop_image(image, s, roi, fill)

    def crops(image):  # as a worker's loop: each crop dropped before the next (its memory reused)
        return lambda: [crop(image, s) and None for s in starts]

    written = {}
    for name in VARIANTS:
        folder = tmp / f"{kind}-{name.replace(' ', '_')}"
        folder.mkdir()
        t = time.perf_counter()
        open_ = _write_variant(folder, vol, name)
        write_s = time.perf_counter() - t
        err = float(np.abs(np.asarray(open_()[0], dtype=np.float32) - vol.image).max())
        written[name] = (folder, open_, write_s, sum(p.stat().st_size for p in folder.iterdir()), err)
    images = {name: w[1]()[0] for name, w in written.items()}
    # warm: pages already in memory, the formats in turn so that a change of load hits them alike
    # and a bound: b2nd's crops moved to the corners of its chunks decode no block outside the crop
    import cache
    default = _variant_of("b2nd")
    at_corners = [[x - x % cache.CHUNK for x in s] for s in starts]
    fns = {n: crops(im) for n, im in images.items()}
    fns["at corners"] = lambda: [crop(images[default], s) and None for s in at_corners]
    warm = {name: t / len(starts) for name, t in median_times(fns, 7).items()}
    print(f"{kind}: {default}, the crops moved to its chunks' corners (no block decoded outside the crop): "
          f"{1e3 * warm['at corners']:.3g} ms warm, {warm['at corners'] / warm['npy float32']:.2f}x npy float32's")
    del images
    rows, base = [], None
    for name, (folder, open_, write_s, size, err) in written.items():
        cold = []
        for s in starts[: max(3, n_crops // 4)]:
            _drop(folder)
            t = time.perf_counter()
            crop(open_()[0], s)
            cold.append(time.perf_counter() - t)
        view = data.Volume("bench", *open_(), vol.record, vol.region_values)
        per_worker = _crops_per_second(view, roi, n_loader)
        base = base or {"bytes": size, "warm": warm[name]}
        rows.append({"case": kind, "format": name, "MB / case": size / 2**20, "x float32 bytes": size / base["bytes"],
                     "write s": write_s, "max error": err, "crop cold ms": 1e3 * float(np.median(cold)),
                     "crop warm ms": 1e3 * warm[name], "x float32 warm": warm[name] / base["warm"],
                     "crops/s / worker": per_worker})
    return rows, {"shape": shape}


# ---- part 3: the GPU's appetite -----------------------------------------------------------------


def bench_data(args):
    import layouts

    quick = args.quick
    here = Path(__file__).resolve().parent / ".cache"  # on disk (the cold reads drop its pages), not a tmpfs
    here.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_", dir=here))
    try:
        n_cases = 2 if quick else 8
        person = _brats_cases(tmp / "brats", n_cases)
        spec = layouts.resolve(tmp / "brats")
        print(f"{n_cases} cases of 4 x 240x240x155 + seg, "
              f"{sum(p.stat().st_size for p in (tmp / 'brats').rglob('*.nii.gz')) / n_cases / 2**20:.1f} MB gzip each")
        _monai_pipeline(spec, tmp, n_cases, 1 if quick else 3)

        _autopet_case(tmp / "autopet", person)
        pet = layouts.resolve(tmp / "autopet")
        roi = (96, 96, 96)
        rows, shapes = [], {}
        for kind, s in [("BraTS", spec), ("AutoPET", pet)]:
            got, info = _formats(tmp, s, kind, roi, 8 if quick else 24, 8 if quick else 80)
            rows += got
            shapes[kind] = "x".join(map(str, info["shape"][1:])) + f" x {info['shape'][0]} channels"
        print_table(f"cache formats: one case each (after the crop to the foreground: BraTS {shapes['BraTS']}, "
                    f"AutoPET {shapes['AutoPET']}), roi {roi[0]}^3 crops, one DataLoader worker", rows, list(rows[0]))

        import cache
        default = {r["case"]: r for r in rows if r["format"] == _variant_of(cache.DEFAULT)}
        gpu_rows = []
        for task, flops in [("pre-training", pretrain_step_flops(48, roi)), ("tuning (segmentation)",
                                                                            tuning_step_flops(48, roi))]:
            for gpu, peak in GPU_PEAK.items():
                step = flops / (peak * 1e12 * args.mfu)
                for kind, r in default.items():
                    gpu_rows.append({"step": task, "GPU": gpu, "TFLOP / step": flops / 1e12,
                                     f"ms / step at {args.mfu:.0%}": 1e3 * step, "case": kind,
                                     "crops/s needed": 1 / step, "crops/s / worker": r["crops/s / worker"],
                                     "workers / GPU": math.ceil(1 / step / r["crops/s / worker"])})
        print_table(f"the GPU's appetite: one crop (batch 1 per GPU) per step at F=48, roi 96^3; workers on this "
                    f"machine's cores, the default format ({name})", gpu_rows, list(gpu_rows[0]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- part 4: a full-size dry run of data.py prepare -----------------------------------------

FULL_COUNT = {"BraTS 2021": 1251, "AutoPET": 1014}


def _prepare_cli(root, cache_dir, fmt, workers):
    """`data.py prepare` as a user runs it: (built, seconds, bytes) from its summary line."""
    import re
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    cmd = [sys.executable, str(here / "data.py"), "prepare", "--data", str(root), "--cache", str(cache_dir),
           "--format", fmt, "--workers", str(workers)]
    t = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    m = re.search(r": (\d+) built, (\d+) already there, ([\d.]+) MB", run.stdout)
    if run.returncode or not m:
        raise SystemExit(f"data.py prepare failed: {run.stderr.strip().splitlines()[-1:]}")
    return int(m.group(1)), seconds, float(m.group(3)) * 2**20


def bench_prepare(args):
    """`data.py prepare` on a sample of BraTS-sized cases and AutoPET-sized studies, each format,
    1 and 2 worker processes, then again (the resumed run finds every entry), extrapolated to the
    case counts of BraTS 2021 and AutoPET. The sample's cases are copies of one demo person, so
    sizes are a person's, not a cohort's spread."""
    import layouts

    here = Path(__file__).resolve().parent / ".cache"
    here.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_", dir=here))
    try:
        n = 4 if args.quick else 12
        person = _brats_cases(tmp / "brats", n)
        studies = 2 if args.quick else 4
        for i in range(studies):
            _autopet_case(tmp / "autopet", person, f"PETCT_{i:03d}")
        sets = [("BraTS 2021", tmp / "brats", n), ("AutoPET", tmp / "autopet", studies)]
        rows = []
        for name, root, count in sets:
            layouts.resolve(root)
            for fmt in ("npy", "tiles", "b2nd"):
                for workers in (1, 2):
                    store = tmp / f"cache-{name}-{fmt}-{workers}".replace(" ", "_")
                    built, seconds, size = _prepare_cli(root, store, fmt, workers)
                    again, resumed, _ = _prepare_cli(root, store, fmt, workers)
                    full = FULL_COUNT[name]
                    rows.append({"set": name, "format": fmt, "--workers": workers, "cases": count, "built": built,
                                 "s": seconds, "s / case": seconds / count, "MB / case": size / count / 2**20,
                                 "resumed s (0 built)": resumed if again == 0 else float("nan"),
                                 "GB at full count": size / count * full / 2**30,
                                 "h at full count": seconds / count * full / 3600})
        print_table(f"data.py prepare on a sample, extrapolated to the full count (BraTS 2021 "
                    f"{FULL_COUNT['BraTS 2021']} cases, AutoPET {FULL_COUNT['AutoPET']} studies; "
                    f"s includes the process start)", rows, list(rows[0]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
