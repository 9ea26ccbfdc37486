"""Dataset layouts: which files make the cases of a data set, what its modalities are called and
what its labels mean (DatasetSpec). Reading, checking and preprocessing the voxels of a case is
data.py.

Layouts, detected from --data PATH:
    brats      <root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz   BraTS 2018-2021, labels 0,1,2,4
               (one extra folder level such as HGG/ LGG/ is allowed)
    brats2023  <root>/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz    BraTS 2023 GLI, labels 0,1,2,3
               (BraTS 2024 post-treatment glioma: the same names, labels 0-4 with 4 the resection
               cavity: labels="brats2024" / --labels brats2024)
    autopet    <root>/<patient>/<study>/{CTres,SUV,SEG}.nii.gz       labels 0,1
    nnunet     <root>/dataset.json, imagesTr/<id>_000k.nii.gz, labelsTr/<id>.nii.gz
    datalist   a MONAI-style JSON file {"training": [{"image": [...], "label": ...}], ...}
    demo       the embedded demo set, BraTS layout (t1, t1ce, t2, flair), built on first use
    demo-petct the same persons in the AutoPET layout (ct, pet)
BraTS 2023 modalities get the BraTS 2021 names (t1n -> t1, t1c -> t1ce, t2w -> t2, t2f -> flair)
so that checkpoints move between the two releases.
"""
import itertools
import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from files import atomic_dir, locked
from metrics import LABELS  # label kind -> (allowed values, regions: name -> label values, in channel order)

HERE = Path(__file__).resolve().parent
DEMO_DIR = HERE / "demo_data"  # demo root: brats/ (resolve("demo")) and autopet/ (resolve("demo-petct"))

BRATS_FILES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}  # modality -> file suffix
BRATS2023_FILES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
AUTOPET_FILES = {"ct": "CTres", "pet": "SUV"}
ALIASES = {  # lower-case names seen in file names and dataset.json files -> modality name
    "t1": "t1", "t1n": "t1", "t1w": "t1", "native": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1-gd": "t1ce", "t1post": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "t2-flair": "flair", "t2flair": "flair",
    "ct": "ct", "ctres": "ct", "pet": "pet", "suv": "pet", "fdg": "pet",
}
NII = (".nii.gz", ".nii")


@dataclass
class Case:
    id: str
    images: dict  # modality -> Path, in channel order
    label: Path | None = None


@dataclass
class DatasetSpec:
    root: Path
    layout: str
    modalities: list  # names in channel order
    cases: list  # of Case
    label_kind: str | None  # "brats", "brats2023", "autopet", "binary", "custom" or None
    label_values: tuple | None = None  # allowed label values, None = not checked
    regions: dict = field(default_factory=dict)  # region name -> label values, in channel order

    def without_labels(self):
        """The same cases with no label file: what self-supervised pre-training reads."""
        return replace(self, cases=[replace(c, label=None) for c in self.cases])

    def case(self, case_id):
        for c in self.cases:
            if c.id == case_id:
                return c
        raise KeyError(f"{self.root}: no case {case_id!r}")


def _nii(folder, stem):
    """Existing NIfTI file folder/stem(.nii.gz|.nii), else the .nii.gz path (reported as missing)."""
    for ext in NII:
        if (folder / (stem + ext)).exists():
            return folder / (stem + ext)
    return folder / (stem + NII[0])


def strip_nii(name):
    """File name without .nii.gz / .nii, or None for another ending."""
    for ext in NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _subdirs(folder):
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_brats(root, files, sep):
    """Case folders (depth 1 or 2) holding files <prefix><sep><suffix>.nii(.gz)."""
    suffixes = list(files.values()) + ["seg"]
    cases = []
    for d in _subdirs(root):
        for folder in [d] + _subdirs(d):
            prefix = None
            for f in sorted(folder.iterdir()):
                stem = strip_nii(f.name)
                for s in suffixes:
                    if stem is not None and stem.endswith(sep + s) and len(stem) > len(sep + s):
                        prefix = stem[: -len(sep + s)]
                        break
                if prefix:
                    break
            if prefix is None:
                continue
            images = {m: _nii(folder, f"{prefix}{sep}{s}") for m, s in files.items()}
            label = _nii(folder, f"{prefix}{sep}seg")
            cases.append(Case(folder.name, images, label if label.exists() else None))
    return cases


def _find_autopet(root):
    cases = []
    for patient in _subdirs(root):
        studies = [s for s in _subdirs(patient)
                   if any((s / (n + e)).exists() for n in ("CTres", "SUV", "SEG") for e in NII)]
        for study in studies:
            cid = patient.name if len(studies) == 1 else f"{patient.name}_{study.name}"
            images = {m: _nii(study, f) for m, f in AUTOPET_FILES.items()}
            label = _nii(study, "SEG")
            cases.append(Case(cid, images, label if label.exists() else None))
    return cases


def modality_name(name):
    """Canonical modality name of a name or alias seen in file names and dataset.json files."""
    return ALIASES.get(name.strip().lower(), name.strip().lower())


def _labels_from_json(labels, where):
    """Label kind, allowed values and regions from a dataset.json 'labels' entry (nnU-Net v1
    {"0": "background", ...} or v2 {"background": 0, ...}, region lists allowed)."""
    if all(k.isdigit() for k in labels):  # v1
        labels = {v: int(k) for k, v in labels.items()}
    named = {k.lower(): v for k, v in labels.items()}
    if any(isinstance(v, list) for v in named.values()):  # region-based (nnU-Net v2)
        short = {"whole tumor": "wt", "tumor core": "tc", "enhancing tumor": "et"}
        regions = {short.get(k, k): tuple(int(x) for x in (v if isinstance(v, list) else [v]))
                   for k, v in named.items() if v not in (0, [0])}
        if set(regions) == {"tc", "wt", "et"}:  # the BraTS channel order
            regions = {k: regions[k] for k in ("tc", "wt", "et")}
        values = tuple(sorted({0, *itertools.chain(*regions.values())}))
        return "custom", values, regions
    values = tuple(sorted(int(v) for v in named.values()))
    if values == (0, 1):
        return "binary", values, {"fg": (1,)}

    def find(*words):
        hits = [v for k, v in named.items() if any(w in k for w in words)]
        return hits[0] if len(hits) == 1 else None
    ncr = find("necro", "ncr", "non-enh", "non enh", "nonenh")
    ed = find("edema", "oedema")
    et = [v for k, v in named.items() if "enhanc" in k and not any(w in k for w in ("non-enh", "non enh", "nonenh"))]
    if ncr is not None and ed is not None and len(et) == 1:
        et = et[0]
        kind = {(1, 2, 4): "brats", (1, 2, 3): "brats2023"}.get((ncr, ed, et), "custom")
        return kind, values, {"tc": (ncr, et), "wt": (ncr, ed, et), "et": (et,)}
    if len(values) < 2:
        raise ValueError(f"{where}: 'labels' lists no foreground label")
    return "custom", values, {k: (v,) for k, v in named.items() if v != 0}


def _resolve_nnunet(root):
    path = root / "dataset.json"
    meta = read_json(path)
    names = meta.get("channel_names") or meta.get("modality")
    if not isinstance(names, dict) or not names:
        raise ValueError(f"{path}: no 'channel_names' (nnU-Net v2) or 'modality' (v1) entry")
    ending = meta.get("file_ending", ".nii.gz")
    channels = [modality_name(names[k]) for k in sorted(names, key=int)]
    dup = sorted({c for c in channels if channels.count(c) > 1})
    if dup:
        raise ValueError(f"{path}: channel names {list(names.values())} repeat {dup}: give each channel "
                         "its own name (e.g. CT and PET), normalisation depends on it")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    ids = sorted({m.group(1) for f in images_dir.iterdir()
                  if (m := re.fullmatch(r"(.+)_(\d{4})" + re.escape(ending), f.name))})
    cases = []
    for cid in ids:
        images = {c: images_dir / f"{cid}_{k:04d}{ending}" for k, c in enumerate(channels)}
        label = labels_dir / f"{cid}{ending}"
        cases.append(Case(cid, images, label if label.exists() else None))
    kind, values, regions = (None, None, {"fg": None})
    if "labels" in meta:
        kind, values, regions = _labels_from_json(meta["labels"], path)
    if kind == "binary" and set(channels) <= {"ct", "pet"}:
        kind, regions = "autopet", {"lesion": (1,)}
    return DatasetSpec(root, "nnunet", channels, cases, kind, values, regions)


def _resolve_datalist(path):
    meta = read_json(path)
    base = Path(meta.get("basedir", path.parent))
    if not base.is_absolute():
        base = path.parent / base
    entries = []
    for key in ("training", "validation", "testing"):
        for e in meta.get(key, []):
            e = {"image": e} if isinstance(e, (str, list)) else e
            if not isinstance(e, dict) or "image" not in e:
                raise ValueError(f"{path}: entry of '{key}' without an 'image': {str(e)[:80]}")
            imgs = e["image"] if isinstance(e["image"], list) else [e["image"]]
            entries.append(([base / p for p in imgs], base / e["label"] if e.get("label") else None))
    if not entries:
        raise ValueError(f"{path}: no entries in 'training', 'validation' or 'testing'")
    n = len(entries[0][0])
    bad = [str(imgs[0]) for imgs, _ in entries if len(imgs) != n]
    if bad:
        raise ValueError(f"{path}: entries have different numbers of images ({n} first, then e.g. {bad[0]})")
    # modality names: the file's 'modality' table, else the suffix of the first entry's file names
    suffixes = [re.split(r"[_\-]", strip_nii(p.name) or p.stem)[-1] for p in entries[0][0]]
    if isinstance(meta.get("modality"), dict) and len(meta["modality"]) == n:
        channels = [modality_name(meta["modality"][k]) for k in sorted(meta["modality"], key=int)]
    else:
        channels = [modality_name(s) if s.lower() in ALIASES else f"ch{k}" for k, s in enumerate(suffixes)]
    if len(set(channels)) != n:
        channels = [f"ch{k}" for k in range(n)]
    cases, seen = [], set()
    for imgs, label in entries:
        stem = strip_nii(imgs[0].name) or imgs[0].stem
        suffix = suffixes[0].lower()
        if suffix in ALIASES and stem.lower().endswith(suffix) and len(stem) > len(suffix) + 1:
            stem = stem[: -len(suffix) - 1]  # case_00_flair -> case_00
        cid = stem if stem not in seen else f"{imgs[0].parent.name}_{stem}"
        if cid in seen:
            raise ValueError(f"{path}: two entries share the case id {cid!r}")
        seen.add(cid)
        cases.append(Case(cid, dict(zip(channels, imgs)), label))
    if "labels" in meta:
        kind, values, regions = _labels_from_json(meta["labels"], path)
    else:
        low = [s.lower() for s in suffixes]
        kind = ("brats" if {"t1ce", "flair"} & set(low) else "brats2023" if {"t1n", "t1c", "t2f"} & set(low)
                else "autopet" if set(channels) <= {"ct", "pet"} else None)
        values, regions = LABELS[kind] if kind else (None, {"fg": None})
    return DatasetSpec(path.parent, "datalist", channels, cases, kind, values, dict(regions))


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _select(spec, modalities):
    """Keeps the requested modalities (names or aliases, list or 'a,b'), in the order given."""
    if modalities is None:
        return spec
    if isinstance(modalities, str):
        modalities = [m for m in modalities.split(",") if m.strip()]
    chosen = [modality_name(m) for m in modalities]
    unknown = [m for m, c in zip(modalities, chosen) if c not in spec.modalities]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"{spec.root}: cannot use modalities {list(modalities)}: available "
                         f"{', '.join(spec.modalities)} (each at most once)")
    spec.modalities = chosen
    for c in spec.cases:
        c.images = {m: c.images[m] for m in chosen}
    return spec


def resolve(data, modalities=None, labels=None):
    """Dataset at `data` (a folder, a datalist JSON, "demo" or "demo-petct") -> DatasetSpec.
    labels: a label convention of LABELS that overrides the detected one (BraTS 2024 keeps the
    BraTS 2023 file names, so its labels 0-4 are chosen here: labels="brats2024")."""
    spec = _resolve(data, modalities)
    return with_labels(spec, labels) if labels else spec


def with_labels(spec, labels):
    """The same cases read with the label convention `labels` of LABELS."""
    if labels not in LABELS:
        raise ValueError(f"labels {labels!r}: choose among {', '.join(LABELS)}")
    values, regions = LABELS[labels]
    return replace(spec, label_kind=labels, label_values=values, regions=dict(regions))


def _resolve(data, modalities=None):
    if str(data) in ("demo", "demo-petct"):
        root = DEMO_DIR if (DEMO_DIR / "manifest.json").exists() else ensure_demo()
        return _resolve(root / ("brats" if str(data) == "demo" else "autopet"), modalities)
    root = Path(data).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    if root.is_file():
        if root.name == "dataset.json" and (root.parent / "imagesTr").is_dir():
            return _select(_resolve_nnunet(root.parent), modalities)
        if root.suffix == ".json":
            return _select(_resolve_datalist(root), modalities)
        raise ValueError(f"{root}: expected a dataset folder or a datalist .json file")
    if (root / "dataset.json").exists() and (root / "imagesTr").is_dir():
        return _select(_resolve_nnunet(root), modalities)
    if not any(not p.name.startswith(".") for p in root.iterdir()):
        raise ValueError(f"{root}: empty folder, expected a dataset")
    found = [
        ("brats", _find_brats(root, BRATS_FILES, "_"), BRATS_FILES),
        ("brats2023", _find_brats(root, BRATS2023_FILES, "-"), BRATS2023_FILES),
        ("autopet", _find_autopet(root), AUTOPET_FILES),
    ]
    found = [f for f in found if f[1]]
    if not found:
        raise ValueError(f"{root}: no known dataset layout (expected BraTS <case>/<case>_t1.nii.gz, BraTS 2023 "
                         "<case>/<case>-t1n.nii.gz, AutoPET <patient>/<study>/CTres.nii.gz, nnU-Net "
                         "dataset.json + imagesTr/, or a datalist .json)")
    if len(found) > 1:
        raise ValueError(f"{root}: holds cases of several layouts ({', '.join(f[0] for f in found)})")
    layout, cases, files = found[0]
    values, regions = LABELS[layout]
    spec = DatasetSpec(root, layout, list(files), cases, layout, values, dict(regions))
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{root}: case ids repeat: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    return _select(spec, modalities)


# ---------------------------------------------------------------------------------------------
# Demo data


def ensure_demo(seed=0, n_persons=32, spacing=2.0, root=DEMO_DIR):
    """Builds the embedded demo set at `root` unless it already holds one made with these
    settings; returns root. resolve("demo") is root/brats, resolve("demo-petct") root/autopet."""
    import demo_data

    root = Path(root)
    want = {"seed": seed, "n_persons": n_persons, "spacing": float(spacing), "version": demo_data.VERSION}

    def current():
        try:
            m = json.loads((root / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return all(m.get(k) == v for k, v in want.items())

    if current():
        return root
    with locked(root.parent / f".{root.name}.lock"):
        if current():
            return root
        print(f"building the demo data set in {root} ({n_persons} persons, {spacing} mm)", file=sys.stderr)
        with atomic_dir(root) as tmp:
            demo_data.build(tmp, n_persons=n_persons, seed=seed, spacing=spacing)
    return root
