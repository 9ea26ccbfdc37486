"""Embedded demo data set: persons with real brain anatomy, in the BraTS 2021 and AutoPET layouts.

Anatomy comes from the MNI152 2009 template (brain mask, grey- and white-matter probability
maps) that ships as package data inside the nilearn wheel. Only the files are used: nilearn is
located with importlib and never imported, so its dependency stack is not needed.

Per person (deterministic by seed and person index):
- anatomy: a global scale, a small rotation and a smooth random deformation of the template;
- a tumour at a random deep white-matter site (about 80% of persons): necrotic core (label 1),
  enhancing rim (4) and oedema (2) spreading along white matter, with mass effect;
- MRI T1, T1ce, T2, FLAIR from spin-echo / inversion-recovery signal equations with
  per-person scanner jitter, gadolinium T1 shortening in the rim, bias field and Rician noise,
  skull-stripped like BraTS;
- CT in HU (brain tissues, CSF gap, skull with diploe, scalp, air) and FDG-PET in SUV
  (GM > WM > CSF, hot rim, cold necrosis, scanner blur, noise, calibration jitter), on the same
  grid as the MRI; the AutoPET lesion is the tumour core (labels 1 and 4).

Layout under OUT:
    brats/<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz      (BraTS 2018-2021 names and labels)
    autopet/<id>/<study>/{CTres,SUV,SEG}.nii.gz         (AutoPET names)
    manifest.json                                       (seed, spacing, per-person facts)
Files are stored in LPS voxel order like the BraTS and AutoPET releases.

    python demo_data.py --out demo_data --persons 32 --seed 0 --spacing 2
"""
import argparse
import importlib.util
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from files import write_json

VERSION = 1
STUDY = "study_0"
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Tissue properties: proton density (relative), T1 and T2 (ms, about 3 T), CT (HU), FDG (SUV).
TISSUES = ("wm", "gm", "csf", "oedema", "necrosis", "enhancing")
PROPS = {
    #             PD     T1     T2    HU   SUV
    "wm":        (0.70,  830.,   80., 28., 3.0),
    "gm":        (0.80, 1330.,  110., 40., 8.5),
    "csf":       (1.00, 4000., 2000.,  8., 0.4),
    "oedema":    (0.90, 1500.,  250., 18., 2.2),
    "necrosis":  (0.95, 2500.,  800., 15., 1.0),
    "enhancing": (0.85, 1400.,  150., 42., 14.0),
}
# Sequences: spin echo (se) S = PD (1 - e^-TR/T1) e^-TE/T2; inversion recovery (ir) adds the
# inversion, with TI chosen so that CSF is nulled (FLAIR).
SEQUENCES = {
    "t1": dict(kind="se", TR=500., TE=15.),
    "t1ce": dict(kind="se", TR=500., TE=15.),
    "t2": dict(kind="se", TR=4000., TE=100.),
    "flair": dict(kind="ir", TR=9000., TI=2500., TE=120.),
}
GD_RELAXIVITY = 4.0e-3  # r1 of gadolinium, 1/(mM ms)


def template_dir():
    """Folder of the MNI152 files inside the installed nilearn wheel (found, never imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nilearn wheel is not installed: the demo data needs its MNI152 files "
                                "(pip install --no-deps nilearn==0.14.1; nilearn itself is never imported)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    for name in TEMPLATE_FILES.values():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: MNI152 template file missing from the nilearn wheel")
    return folder


def load_template(spacing):
    """Template channels (brain, gm, wm) as a (1, 3, X, Y, Z) tensor pooled towards `spacing`,
    with the RAS world coordinates of its first voxel centre and its voxel size."""
    folder = template_dir()
    imgs = {k: nib.load(folder / v) for k, v in TEMPLATE_FILES.items()}
    affine = imgs["t1"].affine
    arr = {k: np.asarray(im.dataobj, dtype=np.float32) / 255.0 for k, im in imgs.items()}
    # the probability maps reach slightly beyond the template's brain mask: take the union
    brain = np.maximum((arr["t1"] > 0).astype(np.float32), np.clip(arr["gm"] + arr["wm"], 0, 1))
    x = torch.from_numpy(np.stack([brain, arr["gm"], arr["wm"]]))[None]  # (1, 3, X, Y, Z)
    f = max(1, int(spacing))  # pool by the integer part of the spacing to avoid aliasing
    if f > 1:
        pad = [(-n) % f for n in x.shape[2:]]
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        x = F.avg_pool3d(x, f)
    origin = affine[:3, 3] + (f - 1) / 2.0
    return x, torch.tensor(origin, dtype=torch.float32), float(f), np.array(imgs["t1"].shape)


def blur_matrix(n, sigma_vox):
    """(n, n) matrix applying a 1-D Gaussian with replicate borders along one axis."""
    r = max(1, int(math.ceil(3 * sigma_vox)))
    offsets = torch.arange(-r, r + 1)
    k = torch.exp(-0.5 * (offsets.float() / sigma_vox) ** 2)
    k = k / k.sum()
    rows = torch.arange(n)[:, None].expand(n, 2 * r + 1)
    cols = (rows + offsets).clamp(0, n - 1)  # replicate border: clamp the source index
    g = torch.zeros(n, n)
    g.index_put_((rows.reshape(-1), cols.reshape(-1)), k.repeat(n), accumulate=True)
    return g


def gaussian_blur(x, sigma_vox):
    """Separable Gaussian blur of a (X, Y, Z) tensor with replicate borders, as three small
    matrix products (much faster than a 3-D convolution on CPU)."""
    if sigma_vox <= 0:
        return x
    gx, gy, gz = (blur_matrix(n, sigma_vox) for n in x.shape)
    x = torch.einsum("ai,ijk->ajk", gx, x)
    x = torch.einsum("bj,ajk->abk", gy, x)
    return torch.einsum("ck,abk->abc", gz, x)


def smooth_noise(rng, shape, coarse, channels=1):
    """Smooth random field ~N(0,1)-scaled: random values on a coarse grid, trilinear upsampling."""
    c = torch.from_numpy(rng.standard_normal((1, channels, coarse, coarse, coarse)).astype(np.float32))
    return F.interpolate(c, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def sample(template, origin, tspacing, points):
    """Trilinear samples of the template channels at RAS points (..., 3) in mm -> (3, ...)."""
    size = torch.tensor(template.shape[2:], dtype=torch.float32)
    idx = (points - origin) / tspacing  # voxel coordinates
    norm = 2 * idx / (size - 1) - 1
    grid = norm.flip(-1)[None]  # grid_sample wants (z, y, x) order for a (X, Y, Z) volume
    return F.grid_sample(template, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def lobes(rng, u, n=5):
    """Smooth random function of the direction u (..., 3) in about [-1, 1]: a lobulated outline."""
    v = rng.standard_normal((n, 3)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    freq, phase = rng.uniform(1.5, 3.5, n), rng.uniform(0, 2 * math.pi, n)
    cos = u @ torch.from_numpy(v).T  # (..., n)
    freq, phase = torch.tensor(freq * math.pi, dtype=torch.float32), torch.tensor(phase, dtype=torch.float32)
    return torch.cos(cos * freq + phase).mean(-1)


def signal(seq, t1, t2, pd):
    """MR signal of one sequence for relaxation times t1, t2 (ms) and proton density pd."""
    tr, te = seq["TR"], seq["TE"]
    if seq["kind"] == "se":
        return pd * (1 - math.exp(-tr / t1)) * math.exp(-te / t2)
    return pd * abs(1 - 2 * math.exp(-seq["TI"] / t1) + math.exp(-tr / t1)) * math.exp(-te / t2)


def choose_site(rng, wm, brain, q0, radius_vox):
    """A white-matter voxel whose neighbourhood (the tumour radius) lies inside the brain,
    preferably in the cerebrum (above the template's z = -5 mm, away from the cerebellum)."""
    integral = F.pad(brain.double().cumsum(0).cumsum(1).cumsum(2), (1, 0, 1, 0, 1, 0))
    cand = torch.nonzero(wm > 0.8)
    above = q0[cand[:, 0], cand[:, 1], cand[:, 2], 2] > -5.0
    if above.any():
        cand = cand[above]
    order = rng.permutation(len(cand))
    shape = torch.tensor(brain.shape)
    best, best_frac = cand[order[0]], -1.0
    for i in order[:400]:
        c = cand[i]
        lo = torch.clamp(c - radius_vox, min=0)
        hi = torch.minimum(c + radius_vox + 1, shape)
        s = (integral[hi[0], hi[1], hi[2]] - integral[lo[0], hi[1], hi[2]] - integral[hi[0], lo[1], hi[2]]
             - integral[hi[0], hi[1], lo[2]] + integral[lo[0], lo[1], hi[2]] + integral[lo[0], hi[1], lo[2]]
             + integral[hi[0], lo[1], lo[2]] - integral[lo[0], lo[1], lo[2]])
        frac = float(s) / float(torch.prod(hi - lo))
        if frac > 0.97:
            return c
        if frac > best_frac:
            best, best_frac = c, frac
    return best


def make_person(index, seed, tumour, template, origin, tspacing, tshape, spacing):
    """Arrays of one person on the output grid (RAS voxel order) and its facts."""
    rng = np.random.default_rng([seed, index])
    s = spacing
    extent = torch.tensor(tshape, dtype=torch.float32)  # template extent in mm (1 mm voxels)
    shape = [int(math.ceil(float(e) / s)) for e in extent]
    centre_t = origin - (tspacing - 1) / 2 + (extent - 1) / 2  # template centre, RAS mm
    first = centre_t - (torch.tensor(shape, dtype=torch.float32) - 1) / 2 * s
    axes = [first[i] + s * torch.arange(shape[i], dtype=torch.float32) for i in range(3)]
    p = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (X, Y, Z, 3) person space, mm

    # personal anatomy: scale, rotation about the brain centre, smooth displacement
    scale = float(rng.uniform(0.92, 1.08)) * rng.uniform(0.97, 1.03, size=3)
    rot = torch.eye(3)
    for a, (i, j) in zip(rng.uniform(-5, 5, size=3) * math.pi / 180, [(1, 2), (0, 2), (0, 1)]):
        r = torch.eye(3)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        rot = rot @ r
    m = (rot / torch.tensor(scale, dtype=torch.float32)).T  # acts on row vectors
    brain_c = torch.tensor([0.0, -18.0, 15.0])
    disp = rearrange(smooth_noise(rng, shape, 5, channels=3), "c x y z -> x y z c") * float(rng.uniform(2.0, 4.0))

    def to_template(pts):
        return brain_c + (pts - brain_c) @ m + disp

    q = to_template(p)
    facts = {"scale": [round(float(v), 4) for v in scale], "tumour": bool(tumour)}
    if tumour:
        coarse = q[::2, ::2, ::2]  # the site needs no full resolution
        brain0, _, wm0 = sample(template, origin, tspacing, coarse)
        radius = float(rng.uniform(max(8.0, 3.0 * s), max(20.0, 3.5 * s)))
        site = choose_site(rng, wm0, brain0 > 0.5, coarse, int(math.ceil(radius / (2 * s))))
        t = p[2 * site[0], 2 * site[1], 2 * site[2]]
        # mass effect: tissue at distance r0 from the site is pushed to r = sqrt(r0^2 + Rm^2)
        d = p - t
        r = d.norm(dim=-1, keepdim=True).clamp_min(1e-3)
        r0 = torch.sqrt(torch.clamp(r ** 2 - (0.8 * radius) ** 2, min=0))
        q = to_template(p + d * ((r0 / r - 1) * torch.exp(-(r / (3 * radius)) ** 2)))
        facts.update(radius_mm=round(radius, 2), centre_mm=[round(float(v), 2) for v in t])
    brain, gm, wm = sample(template, origin, tspacing, q).clamp(0, 1)
    gm = torch.minimum(gm, brain)
    wm = torch.minimum(wm, brain - gm)
    mask = brain > 0.5
    frac = torch.zeros(len(TISSUES), *shape)  # tissue fractions, in the order of TISSUES
    frac[0], frac[1], frac[2] = wm, gm, (brain - gm - wm).clamp_min(0)
    label = torch.zeros(shape, dtype=torch.uint8)
    if tumour:
        edge = 0.35 * s
        dist = (p - t).norm(dim=-1)
        shape_noise = smooth_noise(rng, shape, 6, channels=2)
        core_r = radius * float(rng.uniform(0.5, 0.7))
        r_tum = dist * (1 + 0.15 * shape_noise[0] + 0.25 * lobes(rng, (p - t) / dist[..., None].clamp_min(1e-3)))
        m_core = torch.sigmoid((core_r - r_tum) / edge) * brain
        m_tum = torch.sigmoid((radius - r_tum) / edge) * brain
        # oedema reaches further along white matter and stays out of the ventricles
        inv_b = 1 / brain.clamp_min(1e-3)
        r_oed = dist * (1 + 0.2 * shape_noise[1]) / (0.6 + 0.5 * wm * inv_b)
        oed_r = radius * float(rng.uniform(1.4, 1.9))
        m_oed = (torch.sigmoid((oed_r - r_oed) / edge) * (gm + wm) - m_tum).clamp_min(0)
        frac[3], frac[4], frac[5] = 0.85 * m_oed, m_core, m_tum - m_core
        frac[:3] *= (1 - frac[3:].sum(0) * inv_b).clamp_min(0)
        label = torch.where(mask & (m_oed > 0.35 * brain), 2, label)
        label = torch.where(mask & (m_tum > 0.5 * brain), 4, label)
        label = torch.where(mask & (m_core > 0.5 * brain), 1, label).to(torch.uint8)

    # MRI: per-person scanner jitter of relaxation times and sequence timings; every image is a
    # fixed mixture of per-tissue signals, so one (sequences x tissues) @ (tissues x voxels) product
    jitter = rng.normal(1.0, 0.03, size=(len(TISSUES), 2))
    gd = float(rng.uniform(0.3, 0.6))  # mM gadolinium in the enhancing rim
    weights = torch.zeros(len(SEQUENCES), len(TISSUES))
    for i, (name, seq) in enumerate(SEQUENCES.items()):
        seq = {k: (v * float(rng.uniform(0.95, 1.05)) if k != "kind" else v) for k, v in seq.items()}
        for j, k in enumerate(TISSUES):
            t1, t2 = PROPS[k][1] * jitter[j, 0], PROPS[k][2] * jitter[j, 1]
            if name == "t1ce" and k == "enhancing":
                t1 = 1.0 / (1.0 / t1 + GD_RELAXIVITY * gd)
            weights[i, j] = signal(seq, t1, t2, PROPS[k][0])
    sigs = torch.einsum("st,txyz->sxyz", weights, frac)
    bias = 0.15 * smooth_noise(rng, shape, 4)[0]
    mri = {}
    for i, name in enumerate(SEQUENCES):
        sig = sigs[i] * torch.exp(bias + 0.05 * smooth_noise(rng, shape, 3)[0])
        inside = sig[mask]
        sigma = float(rng.uniform(0.015, 0.035)) * float(inside.mean())
        n = torch.from_numpy(rng.standard_normal((2, *shape), dtype=np.float32)) * sigma
        sig = torch.sqrt((sig + n[0]) ** 2 + n[1] ** 2)  # Rician magnitude noise
        gain = float(rng.uniform(500, 3000)) / float(np.percentile(inside[::5].numpy(), 99.5))
        mri[name] = torch.where(mask, torch.clamp(torch.round(sig * gain), min=1), 0).to(torch.int16)

    # CT: distance outside the brain from a blurred brain mask (d = -sigma * Phi^-1(blur))
    sig_mm = 5.0
    h = gaussian_blur(mask.float(), sig_mm / s).clamp(1e-7, 1 - 1e-7)
    dist = -sig_mm * torch.special.ndtri(h)
    gap, skull, scalp = rng.uniform(1.5, 3.0), rng.uniform(5.0, 8.0), rng.uniform(4.0, 7.0)
    in_csf = ((dist > 0) & (dist <= gap)) | (~mask & (dist <= 0))
    in_skull = (dist > gap) & (dist <= gap + skull)
    in_scalp = (dist > gap + skull) & (dist <= gap + skull + scalp)
    tissue_hu = torch.tensor([PROPS[k][3] for k in TISSUES])
    hu = torch.einsum("t,txyz->xyz", tissue_hu, frac) + (1 - brain) * PROPS["csf"][3]
    hu = torch.where(mask, hu, -1000.0)
    hu = torch.where(in_csf, PROPS["csf"][3], hu)
    u = ((dist - gap) / skull).clamp(0, 1)
    hu = torch.where(in_skull, 700 + 900 * (2 * u - 1) ** 2, hu)  # dense tables, softer diploe
    hu = torch.where(in_scalp, 30.0, hu)
    hu = gaussian_blur(hu, 0.5)
    hu = hu + torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) * float(rng.uniform(6, 14))
    ct = torch.round(hu).clamp(-1024, 3071).to(torch.int16)

    # FDG-PET in SUV: uptake per tissue, scanner blur (FWHM 6 mm), count noise, calibration
    uptake = torch.tensor([PROPS[k][4] for k in TISSUES])
    uptake[5] = float(rng.uniform(15.0, 25.0))
    act = torch.einsum("t,txyz->xyz", uptake, frac) + (1 - brain) * mask * PROPS["csf"][4]
    act = act + in_csf * PROPS["csf"][4] + in_skull * 0.7 + in_scalp * 1.0
    act = gaussian_blur(act, 6.0 / 2.3548 / s)
    noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    act = act + noise * 0.25 * torch.sqrt(act.clamp_min(0.01))
    suv = (gaussian_blur(act, 0.6) * float(rng.uniform(0.85, 1.15))).clamp_min(0)

    return {"mri": mri, "seg": label, "ct": ct, "suv": suv, "first": p[0, 0, 0], "shape": shape}, facts


def lps(arr, first, spacing):
    """RAS-ordered array and its first voxel centre -> LPS-ordered array and affine."""
    shape = arr.shape
    aff = np.diag([-spacing, -spacing, spacing, 1.0])
    last = first.numpy() + spacing * (np.array(shape) - 1)
    aff[:3, 3] = [last[0], last[1], first[2]]  # voxel (0,0,0) is now the R-most, A-most corner
    return np.ascontiguousarray(arr.numpy()[::-1, ::-1, :]), aff


def save(arr, affine, path, dtype=None):
    img = nib.Nifti1Image(arr, affine)
    if dtype is not None:  # stored scaled (scl_slope), read back as float
        img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))


def build(out, n_persons=32, seed=0, spacing=2.0, tumour_fraction=0.8, verbose=True):
    """Writes the demo data set into the folder `out` (created; must not hold a data set)."""
    out = Path(out)
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out}: already holds a demo data set (manifest.json)")
    if n_persons < 1 or spacing <= 0:
        raise ValueError(f"need n_persons >= 1 and spacing > 0, got {n_persons} and {spacing}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small element-wise ops: extra threads cost more than they give
    try:
        return _build(out, n_persons, seed, spacing, tumour_fraction, verbose)
    finally:
        torch.set_num_threads(threads)


def _build(out, n_persons, seed, spacing, tumour_fraction, verbose):
    t0 = time.time()
    template, origin, tspacing, tshape = load_template(spacing)
    rng = np.random.default_rng([seed, 1 << 20])
    with_tumour = set(rng.permutation(n_persons)[: int(round(tumour_fraction * n_persons))].tolist())
    persons = []
    for i in range(n_persons):
        pid = f"demo_{i:03d}"
        arrays, facts = make_person(i, seed, i in with_tumour, template, origin, tspacing, tshape, spacing)
        bdir = out / "brats" / pid
        adir = out / "autopet" / pid / STUDY
        bdir.mkdir(parents=True)
        adir.mkdir(parents=True)
        for name, arr in arrays["mri"].items():
            a, aff = lps(arr, arrays["first"], spacing)
            save(a, aff, bdir / f"{pid}_{name}.nii.gz")
        seg, aff = lps(arrays["seg"], arrays["first"], spacing)
        save(seg, aff, bdir / f"{pid}_seg.nii.gz")
        save(lps(arrays["ct"], arrays["first"], spacing)[0], aff, adir / "CTres.nii.gz")
        save(lps(arrays["suv"], arrays["first"], spacing)[0], aff, adir / "SUV.nii.gz", np.int16)
        save(np.isin(seg, (1, 4)).astype(np.uint8), aff, adir / "SEG.nii.gz")
        persons.append({"id": pid, **facts})
        if verbose:
            print(f"\r{i + 1}/{n_persons} persons ({time.time() - t0:.0f} s)", end="", flush=True)
    if verbose:
        print()
    manifest = {"version": VERSION, "seed": seed, "n_persons": n_persons, "spacing": spacing,
                "layouts": {"brats": "brats", "autopet": "autopet"}, "persons": persons}
    write_json(out / "manifest.json", manifest)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "demo_data"))
    ap.add_argument("--persons", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing", type=float, default=2.0, help="mm; 2 (default) or 1 for full resolution")
    args = ap.parse_args()
    build(args.out, args.persons, args.seed, args.spacing)


if __name__ == "__main__":
    main()
