"""Prediction for new persons: from any subset of a person's scans, every other modality and a
segmentation, as NIfTI files on the grid of the scans.

    python predict.py --ckpt runs/transfer/best.pt [--seg-ckpt runs/seg/best.pt] \\
        --input t1=/scans/p1/t1.nii.gz [--input flair=/scans/p1/flair.nii.gz ...] --out /scans/p1/out
    python predict.py --ckpt runs/transfer/best.pt --seg-ckpt runs/seg/best.pt --input-dir /scans --out /out

--ckpt is a transfer checkpoint of train_downstream.py, --seg-ckpt a segmentation checkpoint;
either alone works. Each network reads the given modalities it was tuned on, through the fused
path (METHOD.md: the means of X_h', skips and inputs over the subset, decoded once).
--input writes one case into OUT; --input-dir writes OUT/<case>/ for every case folder of a
layout layouts.py reads (BraTS 2018-2021, BraTS 2023 / BraSyn, AutoPET, nnU-Net: a dataset folder
or an imagesTs folder of <id>_000k files), files missing allowed: each case is predicted from
the modalities it has.

Inputs are read, checked, reoriented, cropped to the foreground and normalised as for training
(data.py); a case whose spacing differs from the checkpoint's by more than 5% is resampled to it
(trilinear) and the outputs (images, segmentation logits) back onto the case's grid (trilinear;
the label map is made afterwards).
"""
import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import layouts
import inference
import report
from files import atomic_dir, git_commit, json_text
from metrics import LABELS

OUTPUTS = """Per case (OUT with --input, OUT/<case>/ with --input-dir), written in a hidden folder and
renamed when complete:
  <name>.nii.gz              each generated modality (every target of --ckpt not given), named as
                             the inputs are (BraTS 2023: <case>-t2f.nii.gz, BraTS: <case>_flair,
                             AutoPET: CTres / SUV, nnU-Net: <case>_000k, else <modality>.nii.gz)
  seg.nii.gz                 label map in the convention of --seg-ckpt's data (BraTS 2018-2021:
                             1/2/4, BraTS 2023: 1/2/3, AutoPET: 1)
  seg_probabilities.nii.gz   --save-probabilities: sigmoid per region (4-D, order in report.json)
  report.json                inputs, grid, resampling, checkpoints and their commit, device,
                             units, time per stage
  preview.png                --preview: mid-slices of inputs, outputs and the segmentation
Every output lies on the first input's grid (shape, affine, header): float32 images, uint8 labels.
Units: CT in HU (in the training window [-1000, 1000]), PET in SUV, MRI as z-scores inside the
brain mask of the inputs (mean 0, standard deviation 1 over the brain, as in training) and 0
outside. A case with report.json is finished and skipped on a rerun unless --overwrite.
Exit status 1 when any case failed (each failure is one line on stderr)."""

SPACING_TOL = 0.05  # relative spacing difference resampled (as data.compare_contract refuses it)


class CaseError(Exception):
    """A problem of one case (its files, its grid): reported in one line, the case is skipped."""


def one_line(e):
    return " ".join(str(e).split()).strip("'\"")


@dataclass
class Network:
    role: str  # "transfer" or "seg"
    path: Path
    net: torch.nn.Module
    meta: dict
    regions: dict = field(default_factory=dict)  # seg: region name -> label values, channel order


@dataclass
class Case:
    id: str
    images: dict  # modality -> Path, the first one defines the output grid
    folder: Path
    naming: tuple = ("plain", "")  # (kind, prefix) of the input file names


# ---- checkpoints and cases -------------------------------------------------------------------


def load_network(path, role, device):
    """A tuned network of train_downstream.py for `role` (transfer or seg); one line and exit 1
    for a missing, corrupt or wrong-kind file."""
    flag = "--ckpt" if role == "transfer" else "--seg-ckpt"
    try:
        net, meta = inference.load_tuned(path, device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag}: {one_line(e)}") from None
    if meta["task"] != role:
        raise SystemExit(f"{flag} {path}: a {meta['task']} checkpoint; {flag} takes a {role} checkpoint")
    regions = {}
    if role == "seg":
        regions = meta.get("region_values") or dict(LABELS.get(meta["label_kind"], (None, {}))[1])
        if list(regions) != list(meta["regions"]):
            raise SystemExit(f"{flag} {path}: the label values of its regions {meta['regions']} are not recorded "
                             f"(label kind {meta['label_kind']}): no label map can be written")
    return Network(role, Path(path), net, meta, regions)


def modality_name(name, known):
    """Canonical name of a --input name (aliases as layouts.py reads them: t1n -> t1, t2f -> flair)."""
    m = layouts.modality_name(name)
    if m not in known:
        raise SystemExit(f"--input {name}: unknown modality; the checkpoints know {', '.join(known)}")
    return m


def detect_naming(images):
    """(kind, prefix) of the input file names: brats <p>_t1, brats2023 <p>-t1n, autopet CTres,
    nnunet <p>_0000, else plain (every input must follow the kind with one prefix)."""
    stems = {m: layouts.strip_nii(Path(p).name) or Path(p).stem for m, p in images.items()}
    for kind, files, sep in (("brats", layouts.BRATS_FILES, "_"), ("brats2023", layouts.BRATS2023_FILES, "-")):
        ends = [sep + files.get(m, "\0") for m in stems]
        if all(s.endswith(e) and len(s) > len(e) for s, e in zip(stems.values(), ends)):
            prefixes = {s[:-len(e)] for s, e in zip(stems.values(), ends)}
            if len(prefixes) == 1:
                return kind, prefixes.pop()
    if all(s == layouts.AUTOPET_FILES.get(m) for m, s in stems.items()):
        return "autopet", ""
    found = {m.group(1) for s in stems.values() if (m := re.fullmatch(r"(.+)_(\d{4})", s))}
    if len(found) == 1 and all(re.fullmatch(r".+_\d{4}", s) for s in stems.values()):
        return "nnunet", found.pop()
    return "plain", ""


def output_name(case, modality, channels):
    """File name of a generated modality in the naming of the case's inputs (channels: the
    channel order of nnU-Net file numbers)."""
    kind, prefix = case.naming
    if kind == "brats" and modality in layouts.BRATS_FILES:
        return f"{prefix}_{layouts.BRATS_FILES[modality]}.nii.gz"
    if kind == "brats2023" and modality in layouts.BRATS2023_FILES:
        return f"{prefix}-{layouts.BRATS2023_FILES[modality]}.nii.gz"
    if kind == "autopet" and modality in layouts.AUTOPET_FILES:
        return f"{layouts.AUTOPET_FILES[modality]}.nii.gz"
    if kind == "nnunet" and modality in channels:
        return f"{prefix}_{channels.index(modality):04d}.nii.gz"
    return f"{modality}.nii.gz"


def case_from_inputs(pairs, known):
    """The case of --input NAME=PATH pairs."""
    images = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not path:
            raise SystemExit(f"--input {pair}: expected NAME=PATH, e.g. t1=/scans/p1/t1.nii.gz")
        m = modality_name(name, known)
        if m in images:
            raise SystemExit(f"--input {name}: modality {m} given twice")
        images[m] = Path(path).expanduser()
    first = next(iter(images.values()))
    naming = detect_naming(images)
    return Case(naming[1] or first.parent.name or "case", images, first.parent, naming)


def _nnunet_test_cases(root, channels):
    """Cases of a folder of <id>_000k.nii(.gz) files (nnU-Net imagesTs); channel k is the k-th
    entry of a dataset.json beside or above the folder, else the checkpoint's k-th modality."""
    files = {}
    for f in sorted(root.iterdir()):
        m = re.fullmatch(r"(.+)_(\d{4})", layouts.strip_nii(f.name) or "")
        if m and f.is_file():
            files.setdefault(m.group(1), {})[int(m.group(2))] = f
    if not files:
        return []
    for path in (root / "dataset.json", root.parent / "dataset.json"):
        if path.exists():
            try:
                meta = layouts.read_json(path)
            except ValueError as e:
                raise SystemExit(f"--input-dir: {one_line(e)}") from None
            names = meta.get("channel_names") or meta.get("modality") or {}
            channels = [layouts.modality_name(str(names[k])) for k in sorted(names, key=int)]
            break
    cases = []
    for cid, chans in files.items():
        images = {channels[k]: p for k, p in sorted(chans.items()) if k < len(channels)}
        cases.append(Case(cid, images, root, ("nnunet", cid)))
    return cases


def cases_from_dir(root, networks):
    """Every case folder under --input-dir with the modalities it has (missing files left out)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SystemExit(f"--input-dir {root}: no such folder")
    cases = _nnunet_test_cases(root, networks[0].meta["modalities"])
    if cases:
        return cases
    try:
        spec = layouts.resolve(root)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--input-dir: {one_line(e)}") from None
    out = []
    for c in spec.cases:
        images = {m: Path(p) for m, p in c.images.items() if Path(p).exists()}
        folder = Path(next(iter(c.images.values()))).parent
        out.append(Case(c.id, images, folder, detect_naming(images) if images else ("plain", "")))
    return out


# ---- one case ----------------------------------------------------------------------------------


def read(case):
    """The case read, checked and preprocessed (data.load_case without the cache) -> Volume with
    the given modalities in order."""
    if not case.images:
        raise CaseError(f"{case.folder}: no input file of a known modality in the case folder")
    spec = layouts.DatasetSpec(case.folder, "predict", list(case.images), [], None)
    try:
        return data.load_case(layouts.Case(case.id, dict(case.images)), spec, use_cache=False)
    except (FileNotFoundError, ValueError) as e:
        raise CaseError(one_line(e)) from None


def model_shape(record, meta, resample):
    """Shape of the case's preprocessed grid at the checkpoint's spacing, or None when the
    spacings agree within 5% (or the checkpoint records none)."""
    want, have = meta["contract"].get("spacing"), record["spacing"]
    if not want or all(abs(a - b) <= SPACING_TOL * max(a, b) for a, b in zip(have, want)):
        return None
    mm = lambda s: "x".join(f"{v:g}" for v in s)
    if not resample:
        raise CaseError(f"{record['source']}: spacing {mm(have)} mm (R, A, S) differs from the checkpoint's "
                        f"{mm(want)} mm by more than {SPACING_TOL:.0%} and --no-resample is given")
    return [max(1, int(round(n * a / b))) for n, a, b in zip(record["shape_out"], have, want)]


def resample(x, shape):
    """(C, D, H, W) -> (C, *shape), trilinear with the voxel centres of both grids spanning the
    same extent (align_corners=False); float32."""
    if list(x.shape[1:]) == list(shape):
        return x.float()
    return F.interpolate(x[None].float(), size=tuple(shape), mode="trilinear", align_corners=False)[0]


def run_network(network, vol, cfg, bar):
    """Outputs of one network on the preprocessed grid of a case: (used modalities, outputs
    (K, D, H, W) float32 on the CPU, what resampling was done)."""
    meta = network.meta
    given = vol.record["modalities"]
    used = [m for m in given if m in meta["inputs"]]
    if not used:
        raise CaseError(f"{vol.record['source']}: none of the inputs {', '.join(given)} is an input of "
                        f"{network.path} ({', '.join(meta['inputs'])})")
    stitch = torch.device(cfg.stitch_device or cfg.dev)  # where the whole volume and its outputs live
    image = torch.from_numpy(np.array(vol.image, dtype=np.float32)).to(stitch)
    shape = model_shape(vol.record, meta, cfg.resample)
    if shape is not None:
        image = resample(image, shape)
    out = inference.predict(network.net, {m: image[given.index(m)] for m in used}, used, meta,
                            overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size, device=cfg.dev,
                            stitch_device=stitch, progress=bar)
    if shape is not None:
        out = resample(out, vol.record["shape_out"])
    out = out.float().cpu()
    spacing = {"case_mm": vol.record["spacing"], "checkpoint_mm": meta["contract"].get("spacing"),
               "resampled": shape is not None, "model_shape": shape or vol.record["shape_out"]}
    return used, out, spacing


def predict_case(case, networks, cfg, stage):
    """Every output of one case into the folder `stage`; returns report.json's content."""
    times = {}
    t = time.perf_counter()
    vol = read(case)
    rec = vol.record
    times["read"] = time.perf_counter() - t
    fg = np.asarray(vol.fg, dtype=bool)
    outputs, previews, label, checkpoints = {}, {}, None, {}
    channels = networks[0].meta["modalities"]  # nnU-Net file numbers
    for network in networks:
        t = time.perf_counter()
        with tqdm(total=0, desc=f"{case.id} {network.role}", unit="window", leave=False, dynamic_ncols=True,
                  disable=cfg.quiet) as bar:
            used, out, spacing = run_network(network, vol, cfg, bar)
        meta = network.meta
        checkpoints[network.role] = {"path": str(network.path.resolve()), "step": meta["step"],
                                     "commit": meta["commit"],
                                     "init": meta.get("init"), "inputs_used": used, "roi": meta["roi"],
                                     "spacing": spacing}
        times[network.role] = time.perf_counter() - t
        t = time.perf_counter()
        if network.role == "transfer":
            for k, m in enumerate(meta["targets"]):
                if m in rec["modalities"]:
                    continue  # given: not generated
                y = out[k].numpy()
                if data.normalisation(m)["kind"] == "zscore_nonzero":
                    y = y * fg  # MRI background is 0, as in the normalised training data
                if cfg.preview:
                    previews[f"{m} (generated)"] = y
                y = data.denormalise(y, m)
                name = output_name(case, m, channels)
                data.write_nifti(data.restore(y, rec, data.empty_value(m)), rec, stage / name, grid="original")
                outputs[name] = {"kind": "modality", "modality": m, "unit": UNITS[data.normalisation(m)["kind"]],
                                 "dtype": "float32"}
        else:
            label = data.regions_to_label((out > 0).numpy(), network.regions)
            data.write_nifti(data.restore(label, rec), rec, stage / "seg.nii.gz", grid="original")
            values, counts = np.unique(label, return_counts=True)
            outputs["seg.nii.gz"] = {"kind": "label map", "label_kind": meta["label_kind"],
                                     "regions": dict(network.regions), "dtype": "uint8",
                                     "voxels": {int(v): int(c) for v, c in zip(values, counts) if v}}
            if cfg.save_probabilities:
                probs = torch.sigmoid(out).numpy()
                data.write_nifti(np.stack([data.restore(p, rec) for p in probs]), rec,
                                 stage / "seg_probabilities.nii.gz", grid="original")
                outputs["seg_probabilities.nii.gz"] = {"kind": "probabilities", "channels": list(network.regions),
                                                       "dtype": "float32"}
        del out  # the next network's windows need the memory
        times["write"] = times.get("write", 0.0) + time.perf_counter() - t
    if cfg.preview:
        t = time.perf_counter()
        shown = {f"{m} (input)": vol.image[c] for c, m in enumerate(rec["modalities"])}
        report.figure_prediction(stage / "preview.png", {**shown, **previews}, label)
        outputs["preview.png"] = {"kind": "figure"}
        times["preview"] = time.perf_counter() - t
    return {
        "case": case.id,
        "inputs": {m: {"path": str(Path(p).resolve()), "unit": UNITS[data.normalisation(m)["kind"]]}
                   for m, p in case.images.items()},
        "grid": {"reference": rec["source"], "shape": rec["shape"], "affine": rec["affine"],
                 "spacing_mm": data.source_spacing(rec), "crop_ras": rec["box"]},
        "outputs": outputs,
        "checkpoints": checkpoints,
        "units": dict(UNITS),
        "device": str(cfg.dev), "autocast": "bf16" if cfg.dev.type == "cuda" else "float32",
        "overlap": cfg.overlap, "sw_batch_size": cfg.sw_batch_size,
        "commit": cfg.commit,
        "seconds": {k: round(v, 3) for k, v in times.items()},
    }


UNITS = {
    "ct_window": "HU, in the training window [-1000, 1000]",
    "suv_scale": "SUV (body-weight), negatives set to 0",
    "zscore_nonzero": "z-score over the brain mask of the inputs (mean 0, std 1, as the normalised training "
                      "data), 0 outside; MRI has no absolute unit",
}


def finished(dest):
    return (dest / "report.json").is_file()


def write_case(case, networks, cfg, dest):
    """predict_case into a hidden folder beside dest, renamed onto dest when complete (a failed
    case leaves nothing)."""
    if dest.exists() and not (dest.is_dir() and (finished(dest) or not any(dest.iterdir()))):
        raise CaseError(f"{dest}: exists and is not a prediction folder (no report.json); choose another --out")
    inside = [p for p in case.images.values() if dest.resolve() in Path(p).resolve().parents]
    if inside:
        raise CaseError(f"{inside[0]}: an input lies inside the output folder {dest}; choose another --out")
    with atomic_dir(dest) as stage:
        result = predict_case(case, networks, cfg, stage)
        (stage / "report.json").write_text(json_text(result))
    return result


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, epilog=OUTPUTS,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="transfer checkpoint of train_downstream.py (OUT/best.pt or last.pt)")
    ap.add_argument("--seg-ckpt", help="segmentation checkpoint of train_downstream.py")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", metavar="NAME=PATH",
                     help="one scan of the case (repeatable): any non-empty subset of the checkpoints' modalities")
    src.add_argument("--input-dir", help="a folder of cases in a layout layouts.py reads")
    ap.add_argument("--out", required=True, help="output folder (--input-dir: one folder per case in it)")
    ap.add_argument("--save-probabilities", action="store_true", help="also the sigmoid of each region")
    ap.add_argument("--preview", action="store_true", help="a PNG of the mid-slices of inputs and outputs")
    ap.add_argument("--overwrite", action="store_true", help="predict cases again that already have report.json")
    ap.add_argument("--no-resample", dest="resample", action="store_false",
                    help="refuse a case whose spacing differs from the checkpoint's instead of resampling it")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (bf16 autocast on GPU)")
    ap.add_argument("--stitch-device", default="", help="where the whole-volume outputs are blended (default: "
                                                        "--device; cpu for volumes that do not fit the GPU)")
    ap.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    ap.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    cfg = ap.parse_args(argv)
    if not cfg.ckpt and not cfg.seg_ckpt:
        ap.error("give --ckpt (transfer), --seg-ckpt (segmentation) or both")
    if not 0 <= cfg.overlap < 1 or cfg.sw_batch_size < 1:
        ap.error("--overlap must be in [0, 1) and --sw-batch-size >= 1")
    try:
        cfg.dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
        if cfg.stitch_device:
            torch.device(cfg.stitch_device)
    except RuntimeError as e:
        ap.error(f"--device / --stitch-device: {one_line(e)}")
    if "cuda" in (cfg.dev.type, cfg.stitch_device[:4]) and not torch.cuda.is_available():
        ap.error(f"--device {cfg.device}: no CUDA device on this machine")
    cfg.commit = git_commit()  # of this code, recorded in every report.json
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    networks = [load_network(p, role, cfg.dev) for p, role in ((cfg.ckpt, "transfer"), (cfg.seg_ckpt, "seg")) if p]
    known = list(dict.fromkeys(m for n in networks for m in n.meta["modalities"]))
    out = Path(cfg.out).expanduser()
    if cfg.input:
        case = case_from_inputs(cfg.input, known)
        inputs = list(dict.fromkeys(m for n in networks for m in n.meta["inputs"]))
        extra = [m for m in case.images if m not in inputs]
        if extra:
            raise SystemExit(f"--input {', '.join(extra)}: not an input of the checkpoints "
                             f"(inputs: {', '.join(inputs)})")
        jobs = [(case, out)]
    else:
        if out.exists() and not out.is_dir():
            raise SystemExit(f"--out {out}: exists and is not a folder")
        jobs = [(c, out / c.id) for c in cases_from_dir(cfg.input_dir, networks)]
    failed, done, skipped = [], 0, 0
    for case, dest in tqdm(jobs, desc="predict", unit="case", disable=cfg.quiet or len(jobs) == 1, dynamic_ncols=True):
        if finished(dest) and not cfg.overwrite:
            skipped += 1
            continue
        try:
            result = write_case(case, networks, cfg, dest)
        except CaseError as e:
            failed.append(case.id)
            tqdm.write(f"error: case {case.id}: {e}", file=sys.stderr)
            continue
        done += 1
        files = ", ".join(result["outputs"])
        tqdm.write(f"{case.id}: {files} in {dest} ({sum(result['seconds'].values()):.1f} s)", file=sys.stderr)
    print(f"predicted {done} case(s), skipped {skipped} finished one(s) (--overwrite to redo), {len(failed)} failed"
          f"{': ' + ', '.join(failed) if failed else ''}; outputs in {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
