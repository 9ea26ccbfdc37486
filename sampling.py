"""What training sees of the cached cases: random roi crops (CropDataset), the geometric
transforms Phi (exactly invertible rotations, labels alike) and Augment (intensity only).

    phi(x, k, kind), phi_inverse(x, k, kind), n_phi(kind)   kind "rot90" (4 rotations in the
                                                             axial plane), "rot90-yz" (in the
                                                             sagittal plane) or "cube" (24)
    augment(x, generator)                                   intensity scale / shift, patch drop
    CropDataset(volumes_or_cases, roi, fg_fraction, ...)    crops reproducible from (seed, epoch,
                                                             index), whatever the workers or ranks;
                                                             .crop(i, group): at the group's place
    crop_image, dequantise(image, scale), collate           int16 cache crops, made float32 where
                                                             the step runs
"""
import itertools

import numpy as np
import torch

from data import Volume, label_to_regions, load_case
from layouts import Case

# ---- Phi and Augment ---------------------------------------------------------------------------

# The plane of each rot90 kind, as axes of (..., x, y, z) arrays (data.py's RAS order).
# "rot90-yz" (train_pretrain.py's default) turns the sagittal (y, z) plane, the reference code's:
# it rotates each sample x_s[i] (C, H, W, D) over its dims (2, 3); a head's top and bottom differ
# more than its left and right, so crops show their rotation better in this plane
# (docs/method.md). "rot90" turns the axial (x, y) plane, where a crop need only have D = H.
PHI_PLANES = {"rot90": (-3, -2), "rot90-yz": (-2, -1)}
PHI_PLANE = PHI_PLANES["rot90"]
PHI_KINDS = (*PHI_PLANES, "cube")


def _cube_rotations():
    """The 24 proper rotations of the cube as (perm, flips) on the last three axes; the first
    four are rot90 by k = 0..3 in PHI_PLANE, so 'cube' extends 'rot90'."""
    probe = torch.arange(24).reshape(2, 3, 4)
    rots = []
    for perm in itertools.permutations(range(3)):
        sign = np.linalg.det(np.eye(3)[list(perm)])
        for flips in itertools.chain.from_iterable(itertools.combinations(range(3), r) for r in range(4)):
            if sign * (-1) ** len(flips) > 0:
                rots.append((perm, flips))
    first = []
    for k in range(4):
        target = torch.rot90(probe, k, PHI_PLANE)
        first.append(next(r for r in rots if torch.equal(_apply(probe, *r), target)))
    return first + [r for r in rots if r not in first]


def _apply(x, perm, flips):
    lead = x.dim() - 3
    x = x.permute(*range(lead), *[lead + p for p in perm])
    return x.flip([lead + f for f in flips]) if flips else x


CUBE = _cube_rotations()


def n_phi(kind="rot90"):
    """Number of transform classes: 4 (rot90 in one plane) or 24 (all cube rotations)."""
    if kind not in PHI_KINDS:
        raise ValueError(f"unknown transform kind {kind!r}: use one of {', '.join(PHI_KINDS)}")
    return 24 if kind == "cube" else 4


def rotated_axes(kind):
    """The axes of (..., D, H, W) whose sides phi of this kind exchanges: they must be equal."""
    n_phi(kind)
    return (-3, -2, -1) if kind == "cube" else PHI_PLANES[kind]


def phi(x, k, kind="rot90"):
    """Transform k of a tensor (..., D, H, W): images and labels alike (pure indexing)."""
    if not 0 <= k < n_phi(kind):
        raise ValueError(f"transform index {k} outside 0..{n_phi(kind) - 1}")
    if kind in PHI_PLANES:
        return torch.rot90(x, k, PHI_PLANES[kind])
    return _apply(x, *CUBE[k])


def phi_inverse(x, k, kind="rot90"):
    """Exact inverse of phi(., k, kind)."""
    if not 0 <= k < n_phi(kind):
        raise ValueError(f"transform index {k} outside 0..{n_phi(kind) - 1}")
    if kind in PHI_PLANES:
        return torch.rot90(x, -k, PHI_PLANES[kind])
    perm, flips = CUBE[k]
    lead = x.dim() - 3
    x = x.flip([lead + f for f in flips]) if flips else x
    inv = np.argsort(perm)
    return x.permute(*range(lead), *[lead + int(p) for p in inv])


def augment(x, generator, max_drop=0.3, max_block=0.25, scale=0.1, shift=0.1):
    """Intensity-only view of a (C, D, H, W) or (B, C, D, H, W) tensor, geometry unchanged:
    per-channel intensity scale 1 +- scale and shift +- shift, then random boxes (each side up
    to max_block of the volume) filled with N(0, 1) noise until up to max_drop of the voxels
    are dropped (the SwinUNETR self-supervision patch drop)."""
    if x.dim() == 5:
        return torch.stack([augment(v, generator, max_drop, max_block, scale, shift) for v in x])
    c, *size = x.shape
    dev = generator.device

    def uniform(n):
        return torch.rand(n, generator=generator, device=dev).to(x.device)

    a = 1 + (2 * uniform(c) - 1) * scale
    b = (2 * uniform(c) - 1) * shift
    y = x * a.view(c, 1, 1, 1).to(x.dtype) + b.view(c, 1, 1, 1).to(x.dtype)
    target = float(uniform(1)) * max_drop * float(np.prod(size))
    dropped = 0
    while dropped < target:
        lo = [int(torch.randint(0, n, (), generator=generator, device=dev)) for n in size]
        ext = [int(torch.randint(1, max(2, int(n * max_block) + 1), (), generator=generator, device=dev)) for n in size]
        hi = [min(lo_ + e, n) for lo_, e, n in zip(lo, ext, size)]
        box = [h - l_ for l_, h in zip(lo, hi)]
        noise = torch.randn((c, *box), generator=generator, device=dev).to(device=x.device, dtype=x.dtype)
        y[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = noise
        dropped += int(np.prod(box))
    return y


# ---- random roi crops --------------------------------------------------------------------------


def _crop(a, start, roi, fill):
    """a[..., start:start+roi] per spatial axis, with `fill` beyond the array (start may be < 0;
    one fill, or one per channel of a (C, D, H, W) array). One slice of `a`: a compressed cache
    array (cache.Stored) decodes only the blocks under the crop; a crop inside the array is that
    slice itself, copied once."""
    src, dst = [], []
    for s, r, n in zip(start, roi, a.shape[-3:]):
        lo, hi = max(s, 0), min(s + r, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    part = a[(Ellipsis, *src)]
    if part.shape[-3:] == tuple(roi):
        return np.array(part, copy=isinstance(part, np.memmap) or not part.flags.owndata or None)
    out = np.empty(a.shape[:-3] + tuple(roi), dtype=a.dtype)
    out[...] = np.reshape(fill, np.shape(fill) + (1, 1, 1)) if np.ndim(fill) else fill
    out[(Ellipsis, *dst)] = part
    return out


def crop_image(image, start, roi, fill):
    """(crop, scale) of an image (C, D, H, W), value = crop * scale[c]: an int16 cache image
    (cache.Stored with scales) is cropped as its int16 values, to be dequantised where the step
    runs (half the bytes through the loader and to the GPU, no float pass in the worker); any
    other image as float32 with scale 1. `fill` (one, or one per channel) in image values."""
    fill = np.asarray(fill, np.float32)
    scale = getattr(image, "scale", None)
    if scale is None:
        return _crop(image, start, roi, fill).astype(np.float32, copy=False), np.ones(len(image), np.float32)
    levels = np.iinfo(np.int16).max
    return _crop(image.raw, start, roi, np.clip(np.rint(fill / scale), -levels, levels).astype(np.int16)), scale


def dequantise(image, scale):
    """The float32 image of crop_image's (crop, scale), single or batched ((B, C, ...), (B, C)),
    on the crop's device; a float32 crop (scale 1) is returned as it is."""
    if image.dtype == torch.float32:
        return image
    scale = scale.to(image.device, torch.float32)
    return image.float().mul_(scale.view(*scale.shape, *[1] * (image.dim() - scale.dim())))


def collate(samples):
    """default_collate of CropDataset samples; a batch mixing int16 and float32 crops (entries of
    several cache formats) is made float32."""
    if len({s["image"].dtype for s in samples}) > 1:
        samples = [{**s, "image": dequantise(s["image"], s["scale"]), "scale": torch.ones_like(s["scale"])}
                   for s in samples]
    return torch.utils.data.default_collate(samples)


class CropDataset(torch.utils.data.Dataset):
    """Random roi crops of volumes (or of cases, loaded lazily through the cache in each worker).

    Sample i comes from volume i % len(volumes); its randomness depends only on (seed, epoch, i),
    so crops are the same whatever the number of workers or ranks (DistributedSampler). Call
    set_epoch(e) before each epoch. With probability fg_fraction the crop is centred on a random
    labelled voxel (any label > 0; the foreground mask when the case has no label), else placed
    uniformly. Axes shorter than the roi are padded (CT with air, others with 0).
    Returns image (C, *roi) and its scale (C,) (crop_image: int16 from an int16 cache entry,
    else float32 with scale 1; `dequantise` makes it the float32 crop), fg (1, *roi) bool, id,
    start (3,) and, for labelled volumes, label (1, *roi) uint8 (raw values) and regions
    (K, *roi) float32. Batch them with `collate`."""

    def __init__(self, volumes_or_cases, roi, fg_fraction=0.5, samples_per_epoch=None, seed=0,
                 spec=None, cache_dir=None):
        self.items = list(volumes_or_cases)
        if not self.items:
            raise ValueError("CropDataset: no volumes or cases")
        if any(isinstance(v, Case) for v in self.items) and spec is None:
            raise ValueError("CropDataset: cases need spec= to be loaded")
        self.roi = (roi,) * 3 if np.isscalar(roi) else tuple(int(r) for r in roi)
        self.fg_fraction, self.seed, self.epoch = fg_fraction, seed, 0
        self.samples_per_epoch = samples_per_epoch
        self.spec, self.cache_dir = spec, cache_dir
        self._volumes, self._positives = {}, {}

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.samples_per_epoch or len(self.items)

    def volume(self, i):
        item = self.items[i]
        if isinstance(item, Volume):
            return item
        if i not in self._volumes:
            self._volumes[i] = load_case(item, self.spec, self.cache_dir)
        return self._volumes[i]

    def positives(self, i, vol):
        """Flat indices of the voxels a foreground crop may be centred on (at most 100k)."""
        if i not in self._positives:
            src = vol.label if vol.label is not None and np.any(vol.label) else vol.fg
            idx = np.flatnonzero(np.asarray(src))
            if len(idx) > 100_000:
                idx = np.sort(np.random.default_rng(i).choice(idx, 100_000, replace=False))
            self._positives[i] = idx
        return self._positives[i]

    def __getitem__(self, index):
        return self.crop(index)

    def crop(self, index, group=None):
        """Sample `index`; with a `group` (an int), cropped at the group's relative position
        instead of its own: start = round(u * (n - roi)) per axis, u uniform in [0, 1]^3 from
        (seed, group) alone, so the samples of one group show the same region of every person's
        (foreground-boxed) volume, whatever its shape."""
        i = index % len(self.items)
        vol = self.volume(i)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        shape = vol.fg.shape
        centre, where = None, None
        if group is not None:
            where = np.random.default_rng([self.seed, group]).random(3)
        else:
            pos = self.positives(i, vol)
            if rng.random() < self.fg_fraction and len(pos):
                centre = np.unravel_index(pos[rng.integers(len(pos))], shape)
        start = []
        for axis, (n, r) in enumerate(zip(shape, self.roi)):
            if n < r:
                start.append(-((r - n) // 2))
            elif where is not None:
                start.append(int(round(where[axis] * (n - r))))
            elif centre is not None:
                start.append(int(np.clip(centre[axis] - r // 2, 0, n - r)))
            else:
                start.append(int(rng.integers(0, n - r + 1)))
        image, scale = crop_image(vol.image, start, self.roi, vol.record["pad_value"])
        out = {"image": torch.from_numpy(image), "scale": torch.from_numpy(scale),
               "fg": torch.from_numpy(_crop(vol.fg, start, self.roi, False))[None],
               "id": vol.id, "start": torch.tensor(start)}
        if vol.label is not None:
            label = _crop(vol.label, start, self.roi, 0)
            out["label"] = torch.from_numpy(label)[None]
            out["regions"] = torch.from_numpy(label_to_regions(label, vol.region_values))
        return out
