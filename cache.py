"""The on-disk format of a preprocessed case: the arrays of one cache entry of data.load_case
(image (C, D, H, W), fg and label (D, H, W)), written into an entry's folder and read back as
arrays that a random roi crop can slice without decoding the whole volume.

Formats (FORMATS; the default chosen by `python bench.py data`, docs/data.md):
    tiles  each array cut into tiles of TILE = (z, y) voxels that span x, each tile cut down to
          the box (in y and x) outside of which every voxel holds its channel's background (the
          commonest value on the volume's faces: 0 around a z-scored brain, -1 for CT's air),
          the boxes end to end in one uncompressed .npy memory map beside an index of their
          offsets and extents: a crop copies the parts of the boxes under it, in rows of the
          crop's width, and fills the rest; nothing is decoded. The image is int16 with one scale
          per channel as in b2nd (the same error). About a third of npy's bytes on a
          skull-stripped brain; as many as npy-int16 where a volume has no constant background.
    b2nd  blosc2 NDArrays (the format nnU-Net v2 keeps its preprocessed data in), CODEC over
          byte-shuffled chunks of CHUNK^3 voxels made of BLOCK^3 blocks; a slice decodes only
          the blocks it touches. The image is stored as int16 with one scale per channel,
          value = q * scale, scale = max|x| / 32767: the error of a voxel is at most scale / 2,
          i.e. max|x| / 65534 of its channel, plus float32's rounding of the product (an MRI
          z-score reaching 10: 1.5e-4; CT's [-1, 1]: 1.5e-5); 0 stays exactly 0. A training crop
          stays int16 until the step (sampling.crop_image / dequantise).
    npy-int16  the same int16 image and scales in an uncompressed .npy memory map, masks as npy:
          about 0.56x npy's bytes, the fastest crop when the page cache holds the files.
    npy   uncompressed float32 / bool / uint8 .npy files, memory-mapped (exact, about 4x the
          bytes of b2nd).
"""
import numpy as np

FORMATS = ("tiles", "b2nd", "npy-int16", "npy")
DEFAULT = "tiles"
TILE = (16, 16)  # voxels of a tile along z and y (bench.py data compares sizes)
CHUNK, BLOCK = 32, 16  # voxels per side of a chunk and of a block (bench.py data compares sizes)
LEVELS = 32767  # int16 steps from 0 to the channel's largest magnitude
CODEC, CLEVEL = "lz4", 1


def _blosc2():
    """blosc2, imported when a b2nd entry is written or read (npy entries need none), with one
    thread: a process whose blosc2 has started its thread pool forks children that hang on their
    first decode, and DataLoader workers are forked. Parallel reads come from the workers."""
    import blosc2

    if blosc2.nthreads != 1:
        blosc2.set_nthreads(1)
    return blosc2


def _per_axis(n):
    """A side length (one for every axis) or three: (D, H, W)."""
    return (n,) * 3 if isinstance(n, (int, np.integer)) else tuple(n)


def quantise(image):
    """(C, ...) float32 -> (int16 array, per-channel scales): image ~= q * scale[c]."""
    peak = np.abs(image.reshape(len(image), -1)).max(axis=1).astype(np.float64)
    scale = np.where(peak > 0, peak / LEVELS, 1.0).astype(np.float32)
    q = np.empty(image.shape, np.int16)
    for c in range(len(image)):
        q[c] = np.rint(image[c] / scale[c])
    return q, scale


def write(folder, image, fg, label, fmt=DEFAULT, chunk=CHUNK, block=BLOCK, codec=CODEC, clevel=CLEVEL, tile=TILE):
    """Writes the arrays of one entry into `folder`; returns what the entry's record must hold
    to read them back (format and, for the int16 formats, the image's per-channel scales)."""
    arrays = {"image": image, "fg": fg, "label": label}
    if fmt not in FORMATS:
        raise ValueError(f"cache format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "tiles":
        arrays["image"], scale = quantise(image)
        for name, a in arrays.items():
            if a is not None:
                _write_tiles(folder, name, a, tile)
        return {"format": "tiles", "scale": [float(s) for s in scale]}
    if fmt.startswith("npy"):
        record = {"format": fmt}
        if fmt == "npy-int16":
            arrays["image"], scale = quantise(image)
            record["scale"] = [float(s) for s in scale]
        for name, a in arrays.items():
            if a is not None:
                np.save(folder / f"{name}.npy", a)
        return record
    b2 = _blosc2()
    q, scale = quantise(image)
    arrays["image"] = q
    cparams = {"codec": getattr(b2.Codec, codec.upper()), "clevel": clevel, "filters": [b2.Filter.SHUFFLE]}
    for name, a in arrays.items():
        if a is None:
            continue
        spatial = a.shape[-3:]
        lead = (1,) * (a.ndim - 3)
        chunks = lead + tuple(min(c, n) for c, n in zip(_per_axis(chunk), spatial))
        blocks = lead + tuple(min(b, n) for b, n in zip(_per_axis(block), chunks[-3:]))
        b2.asarray(np.ascontiguousarray(a), urlpath=str(folder / f"{name}.b2nd"), mode="w", chunks=chunks,
                   blocks=blocks, cparams=cparams)
    return {"format": "b2nd", "scale": [float(s) for s in scale]}


def read(folder, record):
    """(image, fg, label) of an entry written by write(); label None when it has none: read-only
    memory maps, the int16 images as Stored arrays (b2nd: decoded by the slice)."""
    fmt = record.get("format", "npy")  # entries written before the format was recorded are npy
    if fmt == "tiles":
        label = folder / "label.index.npy"
        return (Stored(Tiled(folder, "image"), record["scale"]), Stored(Tiled(folder, "fg")),
                Stored(Tiled(folder, "label")) if label.exists() else None)
    if fmt.startswith("npy"):
        label = folder / "label.npy"
        image = np.load(folder / "image.npy", mmap_mode="r")
        return (image if fmt == "npy" else Stored(image, record["scale"]), np.load(folder / "fg.npy", mmap_mode="r"),
                np.load(label, mmap_mode="r") if label.exists() else None)
    b2 = _blosc2()
    label = folder / "label.b2nd"

    def open_(path):  # memory-mapped: a crop reads its chunks from the page cache without a read() each
        return b2.open(str(path), mode="r", mmap_mode="r")

    return (Stored(open_(folder / "image.b2nd"), record["scale"]), Stored(open_(folder / "fg.b2nd")),
            Stored(open_(label)) if label.exists() else None)


def _background(a):
    """The commonest value on the faces of a (D, H, W) integer or bool array: what surrounds the
    object (0 around a skull-stripped brain, air around a body, False around a mask)."""
    faces = np.concatenate([f.ravel() for axis in range(3) for f in (a.take(0, axis), a.take(-1, axis))])
    values, counts = np.unique(faces, return_counts=True)
    return values[np.argmax(counts)]


def _write_tiles(folder, name, a, tile):
    """name.tiles.npy (the boxes' voxels end to end, each box (C, z, y, x) in C order),
    name.index.npy ((nz, ny, 5): offset, y0, y1, x0, x1 of each tile's box, relative to the tile;
    y0 == y1 when the tile is all background), name.fill.npy (the background of each channel;
    a scalar for a (D, H, W) array) and name.shape.npy (D, H, W and the tile's sides)."""
    lead = a.ndim == 4
    a = a if lead else a[None]
    fill = np.array([_background(c) for c in a], a.dtype)
    other = (a != fill.reshape(-1, 1, 1, 1)).any(axis=0)
    bz, by = (tile, tile) if isinstance(tile, (int, np.integer)) else tile
    _, D, H, W = a.shape
    index = np.zeros((-(-D // bz), -(-H // by), 5), np.int64)
    parts, offset = [], 0
    for i in range(index.shape[0]):
        for j in range(index.shape[1]):
            zs, ys = slice(i * bz, (i + 1) * bz), slice(j * by, (j + 1) * by)
            m = other[zs, ys].any(axis=0)  # (y, x) of the tile
            index[i, j, 0] = offset
            if m.any():
                r, c = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
                box = a[:, zs, ys][:, :, r[0]:r[-1] + 1, c[0]:c[-1] + 1]
                index[i, j, 1:] = r[0], r[-1] + 1, c[0], c[-1] + 1
                parts.append(box.ravel())
                offset += box.size
    np.save(folder / f"{name}.tiles.npy", np.concatenate(parts) if parts else np.zeros(0, a.dtype))
    np.save(folder / f"{name}.index.npy", index)
    np.save(folder / f"{name}.fill.npy", fill if lead else fill[0])
    np.save(folder / f"{name}.shape.npy", np.array([D, H, W, bz, by], np.int64))


def _selection(idx, ndim):
    """An index of ints and unit-step slices as a tuple of ndim of them (Ellipsis expanded, the
    missing axes whole); anything else (steps, arrays, None) is a TypeError."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (ndim - len(idx) + 1) + idx[k + 1:]
    for i in idx:
        unit_slice = isinstance(i, slice) and i.step in (None, 1)
        if not (unit_slice or isinstance(i, (int, np.integer))) or isinstance(i, bool):
            raise TypeError(f"arrays kept on disk take ints and unit-step slices, not {i!r}")
    return idx + (slice(None),) * (ndim - len(idx))


class Tiled:
    """A read-only array of a `tiles` entry ((C, D, H, W) or (D, H, W)): indexing with ints and
    unit-step slices copies the parts of the boxes under the selection into an array filled
    with the background (one slice assignment per tile touched, in rows of the selection's
    width); the boxes stay memory-mapped."""

    def __init__(self, folder, name):
        self.index = np.load(folder / f"{name}.index.npy")
        fill = np.load(folder / f"{name}.fill.npy")
        self.lead, self.fill = fill.ndim == 1, fill.reshape(-1)
        *spatial, self.bz, self.by = (int(n) for n in np.load(folder / f"{name}.shape.npy"))
        self.shape = (len(self.fill),) * self.lead + tuple(spatial)
        self.dtype, self.ndim = self.fill.dtype, len(self.shape)
        empty = not (self.index[..., 2] > self.index[..., 1]).any()  # all background: no file to map
        self.data = np.zeros(0, self.dtype) if empty else np.load(folder / f"{name}.tiles.npy", mmap_mode="r")

    def __len__(self):
        return self.shape[0]

    def _ranges(self, idx):
        """(lo, hi) per axis of a selection of ints and unit-step slices, and the int axes."""
        idx = _selection(idx, self.ndim)
        if len(idx) != self.ndim:
            raise IndexError(f"{len(idx)} indices for an array of {self.ndim} dimensions")
        ranges, ints = [], []
        for axis, (i, n) in enumerate(zip(idx, self.shape)):
            if isinstance(i, slice):
                lo, hi, _ = i.indices(n)
                ranges.append((lo, max(lo, hi)))
            else:
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
                ranges.append((int(i) % n, int(i) % n + 1))
                ints.append(axis)
        return ranges, ints

    def __getitem__(self, idx):
        ranges, ints = self._ranges(idx)
        (c0, c1), (z0, z1), (y0, y1), (x0, x1) = ranges if self.lead else [(0, 1)] + ranges
        out = np.empty((c1 - c0, z1 - z0, y1 - y0, x1 - x0), self.dtype)
        out[...] = self.fill[c0:c1].reshape(-1, 1, 1, 1)
        C, D, bz, by = len(self.fill), self.shape[-3], self.bz, self.by
        for i in range(z0 // bz, -(-z1 // bz) if z1 > z0 else 0):
            tz = min(bz, D - i * bz)
            zs, ze = max(z0 - i * bz, 0), min(z1 - i * bz, tz)
            for j in range(y0 // by, -(-y1 // by) if y1 > y0 else 0):
                off, r0, r1, q0, q1 = self.index[i, j].tolist()
                ys, ye = max(y0 - j * by, r0), min(y1 - j * by, r1)
                xs, xe = max(x0, q0), min(x1, q1)
                if ys >= ye or xs >= xe:
                    continue
                box = self.data[off:off + C * tz * (r1 - r0) * (q1 - q0)].reshape(C, tz, r1 - r0, q1 - q0)
                out[:, i * bz + zs - z0:i * bz + ze - z0, j * by + ys - y0:j * by + ye - y0, xs - x0:xe - x0] = \
                    box[c0:c1, zs:ze, ys - r0:ye - r0, xs - q0:xe - q0]
        out = out if self.lead else out[0]
        return out.reshape([n for axis, n in enumerate(out.shape) if axis not in ints]) if ints else out

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)


class Stored:
    """A read-only array kept on disk (a Tiled array, a blosc2 NDArray or an int16 memory map,
    optionally with one scale per channel of its first axis): indexing with ints and slices reads
    only the tiles or blocks the selection touches and returns a numpy array; `a[c]` of an image is the channel, still
    on disk; np.asarray(a) decodes it all."""

    def __init__(self, arr, scale=None, channel=None):
        self.arr, self.channel = arr, channel
        self.scale = None if scale is None else np.asarray(scale, np.float32)

    @property
    def raw(self):
        """The stored values themselves (the int16 image without its scales)."""
        return Stored(self.arr, None, self.channel)

    @property
    def shape(self):
        return tuple(self.arr.shape[0 if self.channel is None else 1:])

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def dtype(self):
        return np.dtype(np.float32) if self.scale is not None else np.dtype(self.arr.dtype)

    def __len__(self):
        return self.shape[0]

    def _full_index(self, idx):
        idx = _selection(idx, self.ndim)
        return idx if self.channel is None else (self.channel, *idx)

    def __getitem__(self, idx):
        if self.channel is None and self.scale is not None and isinstance(idx, (int, np.integer)):
            return Stored(self.arr, self.scale, int(idx))  # a channel: still on disk
        full = self._full_index(idx)
        out = np.asarray(self.arr[full])
        if self.scale is None:
            return out
        s = self.scale[full[0]]
        out = out.astype(np.float32)  # then scaled in place: one pass fewer than out * s
        out *= s if np.ndim(s) == 0 else s.reshape(-1, *[1] * (out.ndim - 1))
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)
