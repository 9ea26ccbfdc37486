"""Inference with a trained network: the one layer below training, evaluation and prediction.

    load_tuned(path) -> (net, meta), load_pretrained(path) -> (net, meta)
                the network rebuilt from the architecture record of its checkpoint
                (model.build_model), in eval mode, and what it was tuned for
    single, encode, fuse, fused_outputs
                the fused path: each modality alone on every input channel, encoded and
                personalized; the means over a subset of modalities decoded once (a subset of
                one modality is the per-modality path). Training uses the same functions.
    pad_to_roi  a (C, D, H, W) volume padded to at least the roi, each channel with its value
    sliding_window_inference
                whole-volume inference of any function on windows, Gaussian blending
    predict_subsets, predict
                whole-volume outputs of a tuned network from subsets of modalities (all |M|
                channels, or only those a person has)
    to_source_grid
                outputs on the preprocessed grid -> the case's source grid (data.restore)
    central_crop, person_features, embed
                X_h' of each modality of a person (central roi crop)
    representation_tables
                z, z', X_h' and the prior attention's entropy of many persons, for the
                mechanism metrics
    device_of, open_checkpoint, open_data, split_cases, open_case
                what a command is given (device, checkpoint, data set, cases), or a one-line
                SystemExit that names the file and the problem
"""
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import data
import layouts
from files import read_checkpoint
from metrics import LABELS, as_tensor, attention_entropy
from model import PersonalizedSwinUNETR, build_model


def load_tuned(path, device="cpu"):
    """A tuned model (OUT/best.pt or OUT/last.pt of train_downstream.py) in eval mode and its
    meta: task, modalities (channel order), inputs, targets or regions (and their label values),
    roi, label kind, arch, contract, split, step, val, commit of the code that trained it.
    Raises FileNotFoundError / ValueError naming the file."""
    ck = read_checkpoint(path)
    if ck.get("kind") != "downstream":
        raise ValueError(f"{path}: not a train_downstream checkpoint (kind {ck.get('kind')!r})")
    net = build_model(ck["arch"])
    net.load_state_dict(ck["model"])
    meta = {**ck["task"], "arch": ck["arch"], "contract": ck["contract"], "split": ck["split"],
            "step": ck["step"], "val": ck.get("val"), "commit": ck.get("commit", "unknown")}
    return net.to(device).eval(), meta


def load_pretrained(path, device="cpu", untrained=False):
    """A stage-1 model (OUT/last.pt of train_pretrain.py) in eval mode and its meta: modalities,
    roi, arch, contract, split, step, seed. untrained=True: the same network with the initial
    weights of that run (its seed), for the untrained baseline. Raises FileNotFoundError /
    ValueError naming the file."""
    ck = read_checkpoint(path)
    if ck.get("kind") != "pretrain":
        raise ValueError(f"{path}: not a train_pretrain checkpoint (kind {ck.get('kind')!r})")
    seed = ck["config"]["seed"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # train_pretrain seeds the same way before building its network
        net = build_model(ck["arch"])
    if not untrained:
        net.load_state_dict(ck["model"])
    meta = {"modalities": ck["modalities"], "roi": ck["arch"]["roi"], "arch": ck["arch"], "contract": ck["contract"],
            "split": ck["split"], "step": 0 if untrained else ck["step"], "seed": seed,
            "preset": ck["config"]["preset"]}
    return net.to(device).eval(), meta


# ---- the fused path ----------------------------------------------------------------------------


def encode(net, u):
    """(X_h', skips) of one input u (B, |M|, *roi) holding a single modality on every channel."""
    z, skips = net.encode(u)
    return (net.personalize(z) if isinstance(net, PersonalizedSwinUNETR) else z), skips


def fuse(feats, w):
    """Means over each person's subset. feats[i] = (X_h^i', skips^i, u^i) of the modalities i;
    w (n, B) 0/1 with a non-empty column per person. Returns (X_h', skips, u) to decode."""
    w = w / w.sum(0, keepdim=True)

    def mean(ts):
        return torch.einsum("nb,nb...->b...", w.to(ts[0]), torch.stack(ts))

    n_skips = len(feats[0][1])
    return (mean([f[0] for f in feats]), [mean([f[1][k] for f in feats]) for k in range(n_skips)],
            mean([f[2] for f in feats]))


def single(x, i):
    """Modality i of x (B, |M|, D, H, W) repeated on all |M| channels (how a modality is fed)."""
    return x[:, i:i + 1].repeat(1, x.shape[1], 1, 1, 1)


def fused_outputs(net, x, subsets):
    """Outputs of the fused path for each subset (channel indices) of x (B, |M|, *roi); every
    modality is encoded once, however many subsets use it."""
    feats = {}
    for i in sorted({i for s in subsets for i in s}):
        u = single(x, i)
        feats[i] = (*encode(net, u), u)
    ones = [torch.ones(len(s), x.shape[0], device=x.device) for s in subsets]
    return [net.decode(*fuse([feats[i] for i in s], w)) for s, w in zip(subsets, ones)]


# ---- whole volumes -----------------------------------------------------------------------------


def pad_to_roi(x, roi, values=0.0):
    """x (C, D, H, W) padded symmetrically (an odd voxel after) to at least roi along each axis,
    channel c with values[c] (or one value for all). Returns (padded, crop): padded[:, crop]
    is x again."""
    size = tuple(x.shape[1:])
    pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, size)]
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pad, size))
    if not any(a or b for a, b in pad):
        return x, crop
    flat = [v for ab in reversed(pad) for v in ab]
    values = [values] * x.shape[0] if np.isscalar(values) else list(values)
    if not any(values):
        return F.pad(x, flat), crop
    return torch.stack([F.pad(x[c], flat, value=v) for c, v in enumerate(values)]), crop


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
                             sigma_scale=0.125, out_channels=None, device=None, stitch_device=None, progress=None):
    """Whole-volume inference: fn maps (n, C, *roi) -> (n, K, *roi); image is (C, D, H, W) or
    (1, C, D, H, W) of any size (zero-padded symmetrically where smaller than roi, cropped
    back). Windows run in batches of sw_batch_size on `device` (default: the image's); outputs
    are blended with the importance map and stitched on `stitch_device` (default: the image's;
    "cpu" keeps the full-size accumulators off the GPU). Accumulation is float64, so an identity
    fn gives back a float32 input exactly. progress: a tqdm bar, its total raised by the number
    of windows and advanced per batch. Returns the output in fn's dtype, shaped like image."""
    x = as_tensor(image, "sliding_window_inference image")
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
    x, crop = pad_to_roi(x, roi)
    full = tuple(x.shape[1:])
    weight = importance_map(roi, blend, sigma_scale, stitch)
    windows = list(itertools.product(*[_window_starts(s, r, overlap) for s, r in zip(full, roi)]))
    acc, norm, out_dtype = None, torch.zeros(full, dtype=torch.float64, device=stitch), None
    if progress is not None:
        progress.total = (progress.total or 0) + len(windows)
        progress.refresh()
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
        if progress is not None:
            progress.update(len(batch))
    out = acc.div_(norm)[(slice(None), *crop)].to(out_dtype)  # in place: no second full-size float64 copy
    return out[None] if batched else out



def subset_indices(subset, names):
    """Modality names or channel indices -> sorted channel indices (non-empty, known, distinct)."""
    idx = [names.index(s) if isinstance(s, str) and s in names else s for s in subset]
    if not idx or any(not isinstance(i, (int, np.integer)) or not 0 <= i < len(names) for i in idx) \
            or len(set(idx)) != len(idx):
        raise ValueError(f"subset {list(subset)}: expected a non-empty set of the modalities {names} "
                         "(names or channel indices)")
    return sorted(int(i) for i in idx)


@torch.no_grad()
def predict_subsets(model, image, subsets, meta, roi=None, overlap=0.5, sw_batch_size=4, blend="gaussian",
                    device=None, amp=True, stitch_device=None, progress=None):
    """Whole-volume outputs of a tuned model from each subset of modalities (names or channel
    indices) of image (|M|, D, H, W), normalised as data.load_case gives it, or a dict modality
    -> (D, H, W) holding at least the modalities of the subsets (a person scanned with some of
    them); channels outside the subsets are never read. One pass of sliding windows of the training roi with Gaussian
    blending (each modality encoded once per window); axes shorter than the roi are padded with
    each modality's empty-space value (CT: air), as training crops are. Returns a list of float32
    (K, D, H, W): seg logits per region (> 0 is inside) or the target modalities."""
    names = list(meta["modalities"])
    idx = [subset_indices(s, names) for s in subsets]
    if not idx:
        raise ValueError("predict: no subsets of modalities given")
    if isinstance(image, dict):
        image = _stack(image, names, {names[i] for s in idx for i in s})
    x = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, dtype=np.float32))
    if x.ndim != 4 or x.shape[0] != len(names):
        raise ValueError(f"predict: image must be ({len(names)}, D, H, W) for the modalities {names}, "
                         f"got shape {tuple(x.shape)}")
    roi = tuple(int(r) for r in (roi or meta["roi"]))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    x, crop = pad_to_roi(x.float(), roi, [data.pad_value(m) for m in names])

    def fn(xb):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
            return torch.cat(fused_outputs(model, xb, idx), 1).float()

    out = sliding_window_inference(fn, x, roi, overlap, sw_batch_size, blend, device=dev,
                                   stitch_device=stitch_device, progress=progress)
    out = out[(slice(None), *crop)]
    return list(out.chunk(len(idx)))


def _stack(volumes, names, needed):
    """{modality: (D, H, W)} -> (|M|, D, H, W) in the channel order `names`; a modality not given
    (never read) holds its empty-space value."""
    missing = sorted(needed - set(volumes))
    unknown = sorted(set(volumes) - set(names))
    if missing or unknown or not volumes:
        raise ValueError(f"predict: the subsets need {sorted(needed)}, given {sorted(volumes)} "
                         f"(the network's modalities: {names})")
    vols = {m: torch.as_tensor(np.asarray(v, dtype=np.float32)) if not isinstance(v, torch.Tensor) else v.float()
            for m, v in volumes.items()}
    shapes = {tuple(v.shape) for v in vols.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"predict: the modalities must be (D, H, W) volumes of one shape, got {sorted(shapes)}")
    ref = next(iter(vols.values()))
    return torch.stack([vols[m] if m in vols else torch.full_like(ref, data.pad_value(m)) for m in names])


def predict(model, image, subset, meta, roi=None, overlap=0.5, sw_batch_size=4, blend="gaussian", device=None,
            amp=True, stitch_device=None, progress=None):
    """predict_subsets for one subset: (K, D, H, W) float32."""
    return predict_subsets(model, image, [subset], meta, roi, overlap, sw_batch_size, blend, device, amp,
                           stitch_device, progress)[0]


def to_source_grid(outputs, record, names=None):
    """Outputs (K, D, H, W) on the preprocessed grid of a case -> (K, X, Y, Z) numpy on its
    source grid (data.restore: exact inverse of crop, padding and reorientation). Channels named
    by `names` (modalities) get that modality's empty-space value outside the crop (CT: air),
    other channels 0."""
    a = outputs.float().cpu().numpy() if isinstance(outputs, torch.Tensor) else np.asarray(outputs)
    fills = [data.pad_value(m) for m in names] if names is not None else [0] * len(a)
    if len(fills) != len(a):
        raise ValueError(f"to_source_grid: {len(a)} channels, {len(fills)} names")
    return np.stack([data.restore(c, record, f) for c, f in zip(a, fills)])


@torch.no_grad()
def central_crop(image, names, roi, device="cpu", offset=(0, 0, 0)):
    """The central roi crop (padded to the roi where smaller) of an image (|M|, D, H, W), moved
    by `offset` voxels along each axis (the image padded as far as that needs): (1, |M|, *roi)
    on `device`."""
    need = [r + 2 * abs(o) for r, o in zip(roi, offset)]
    x, _ = pad_to_roi(torch.as_tensor(np.array(image, dtype=np.float32)), need, [data.pad_value(m) for m in names])
    lo = [(s - r) // 2 + o for s, r, o in zip(x.shape[1:], roi, offset)]
    return x[:, lo[0]:lo[0] + roi[0], lo[1]:lo[1] + roi[1], lo[2]:lo[2] + roi[2]][None].to(torch.device(device))


def person_features(net, image, names, roi, device="cpu", inputs=None):
    """X_h' (flattened, float32 on the CPU) of each modality in `inputs` (default: all of
    `names`, the channel order of image (|M|, D, H, W)) from the central roi crop; z for a plain
    SwinUNETR, which has no personalization."""
    x = central_crop(image, names, roi, device)
    feats = []
    for m in inputs or names:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            xh, _ = encode(net, single(x, names.index(m)))
        feats.append(rearrange(xh.float(), "1 c d h w -> (c d h w)").cpu())
    return feats


def representation_tables(net, images, names, roi, device="cpu"):
    """For the mechanism metrics, from the central roi crop of each image in `images` (one per
    person), every modality alone: {"z", "z'", "X_h'": (persons, modalities, d) float32 on the
    CPU; "attention": (persons, modalities) the prior attention's softmax entropy over its
    maximum}. Without the prior there is no z' nor attention, and X_h' is z."""
    rows = {}
    with torch.no_grad():
        for im in images:
            x, person = central_crop(im, names, roi, device), {}
            for m in names:
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                    z, _ = net.encode(single(x, names.index(m)))
                    reps = net.representations(z) if isinstance(net, PersonalizedSwinUNETR) else {"z": z, "X_h'": z}
                for k, v in reps.items():
                    if v is None:
                        continue
                    v = (torch.tensor(attention_entropy(v.float())["ratio"]) if k == "attention"
                         else rearrange(v.float(), "1 c d h w -> (c d h w)").cpu())
                    person.setdefault(k, []).append(v)
            for k, v in person.items():
                rows.setdefault(k, []).append(torch.stack(v))
    return {k: torch.stack(v) for k, v in rows.items()}


def embed(net, vol, meta, device="cpu"):
    """X_h' of each input modality of one person (a data.Volume) of a tuned network (meta of
    load_tuned), from the central roi crop; [] for a network without personalization."""
    if not isinstance(net, PersonalizedSwinUNETR):
        return []
    return person_features(net, vol.image, meta["modalities"], tuple(meta["roi"]), device, meta["inputs"])


# ---- what a command is given ---------------------------------------------------------------------


def device_of(name):
    """--device: auto (cuda when there is one), cuda, cpu or cuda:N."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def open_checkpoint(load, path, device, *args):
    """load(path, device, *args) (load_tuned or load_pretrained); a bad file stops with one line
    (torch's unpickling errors span paragraphs)."""
    try:
        return load(path, device, *args)
    except (ValueError, OSError) as e:
        raise SystemExit(" ".join(str(e).split())[:400]) from None


def open_data(where, want, meta, stage, ckpt):
    """The data set at `where` (a folder, datalist JSON or demo name) with the channels `want`,
    checked against the contract of the checkpoint `ckpt` (its meta) made by `stage`."""
    try:
        labels = meta.get("label_kind") if meta.get("label_kind") in LABELS else None  # the tuning's
        spec = layouts.resolve(where, want, labels)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{' '.join(str(e).split())} (the checkpoint needs {','.join(meta['modalities'])})") from None
    problems = data.compare_contract(meta["contract"], data.contract(spec))
    if problems:
        raise SystemExit(f"{ckpt}: the data differ from the {stage} data: {'; '.join(problems)}")
    return spec


def split_cases(spec, meta, split, ckpt):
    """The ids of the checkpoint's `split` (test, val, train; all: every case of the data), all
    of them present in the data set `spec`."""
    ids = sorted(c.id for c in spec.cases) if split == "all" else list(meta["split"][split])
    if not ids:
        raise SystemExit(f"{ckpt}: the checkpoint's {split} split is empty (--split all evaluates every "
                         "case of --data)")
    known = {c.id for c in spec.cases}
    missing = [i for i in ids if i not in known]
    if missing:
        raise SystemExit(f"{spec.root}: no cases {', '.join(missing[:5])} of the checkpoint's {split} split "
                         "(another dataset? --split all evaluates every case of --data)")
    return ids


def open_case(spec, case_id, cache, exact=False):
    """Reads, checks and preprocesses one case; bad input stops with data.py's one-line message
    (it names the file and the problem). exact reads the source files, not the cache, whose
    default format is quantised (cache.py): what is scored is the data itself."""
    try:
        return data.load_case(spec.case(case_id), spec, cache, use_cache=not exact)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(" ".join(str(e).split()).strip("'\"")) from None
