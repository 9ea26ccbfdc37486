"""The on-disk format of a preprocessed case: the arrays of one cache entry of data.load_case
(image (C, D, H, W), fg and label (D, H, W)), written into an entry's folder and read back as
arrays that a random roi crop can slice without decoding the whole volume.

Formats (FORMATS; the default chosen by `python bench.py data`, docs/data.md):
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

FORMATS = ("b2nd", "npy-int16", "npy")
DEFAULT = "b2nd"
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


def write(folder, image, fg, label, fmt=DEFAULT, chunk=CHUNK, block=BLOCK, codec=CODEC, clevel=CLEVEL):
    """Writes the arrays of one entry into `folder`; returns what the entry's record must hold
    to read them back (format and, for the int16 formats, the image's per-channel scales)."""
    arrays = {"image": image, "fg": fg, "label": label}
    if fmt not in FORMATS:
        raise ValueError(f"cache format {fmt!r}: choose one of {', '.join(FORMATS)}")
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


class Stored:
    """A read-only array kept on disk (a blosc2 NDArray or an int16 memory map, optionally with
    one scale per channel of its first axis): indexing with ints and slices decodes only the blocks
    the selection touches and returns a numpy array; `a[c]` of an image is the channel, still
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
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (self.ndim - len(idx) + 1) + idx[k + 1:]
        for i in idx:
            if not isinstance(i, (slice, int, np.integer)) or (isinstance(i, slice) and i.step not in (None, 1)):
                raise TypeError(f"Stored arrays take ints and unit-step slices, not {i!r}")
        idx = idx + (slice(None),) * (self.ndim - len(idx))
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
