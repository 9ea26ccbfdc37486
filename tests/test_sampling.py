"""sampling.py: Phi against brute-force rotations and exact inverses, Augment's reproducibility
and patch drop, crop sizes, the foreground ratio, padding, and crops independent of workers and
samplers."""
import itertools

import numpy as np
import pytest
import torch

import data
import runtime as R
import sampling


# ---------------------------------------------------------------------------------------------
# Transforms


def _cube_reference(x):
    """Closure of np.rot90 over the three planes, starting from x: the 24 cube rotations."""
    seen = {x.tobytes() + bytes(str(x.shape), "ascii"): x}
    frontier = [x]
    while frontier:
        nxt = []
        for a in frontier:
            for axes in ((0, 1), (0, 2), (1, 2)):
                b = np.ascontiguousarray(np.rot90(a, 1, axes))
                key = b.tobytes() + bytes(str(b.shape), "ascii")
                if key not in seen:
                    seen[key] = b
                    nxt.append(b)
        frontier = nxt
    return seen


def test_phi_exact_inverses():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 5, 6, 7, generator=g)
    label = torch.randint(0, 5, (1, 5, 6, 7), generator=g, dtype=torch.uint8)
    assert (sampling.n_phi(), sampling.n_phi("rot90"), sampling.n_phi("cube")) == (4, 4, 24)
    assert sampling.n_phi("rot90-yz") == 4
    for kind in ("rot90", "rot90-yz", "cube"):
        for k in range(sampling.n_phi(kind)):
            for x in (image, label):
                y = sampling.phi(x, k, kind)
                assert torch.equal(sampling.phi_inverse(y, k, kind), x)
    for k in range(4):  # rot90 in the axial plane, the first four cube rotations are the same
        ref = np.rot90(image.numpy(), k, axes=(-3, -2))
        assert np.array_equal(sampling.phi(image, k).numpy(), ref)
        assert torch.equal(sampling.phi(image, k, "cube"), sampling.phi(image, k))
    for k in range(4):  # the reference code's plane: each sample (C, x, y, z) over its dims (2, 3)
        sample = image[0].numpy()
        assert np.array_equal(sampling.phi(image[0], k, "rot90-yz").numpy(), np.rot90(sample, k, axes=(2, 3)))
    assert sampling.rotated_axes("rot90") == (-3, -2) and sampling.rotated_axes("rot90-yz") == (-2, -1)
    cube = torch.arange(60).reshape(3, 4, 5)
    ref = _cube_reference(cube.numpy())
    got = {sampling.phi(cube, k, "cube").numpy().tobytes() + bytes(str(tuple(sampling.phi(cube, k, "cube").shape)), "ascii")
           for k in range(24)}
    assert len(ref) == 24 and got == set(ref)
    with pytest.raises(ValueError):
        sampling.phi(image, 4)


def test_augment_intensity_and_patch_drop():
    x = 100 + torch.rand(2, 24, 20, 16, generator=torch.Generator().manual_seed(1))
    y = sampling.augment(x, torch.Generator().manual_seed(5))
    assert y.shape == x.shape and not torch.equal(y, x)
    assert torch.equal(y, sampling.augment(x, torch.Generator().manual_seed(5)))  # reproducible
    assert not torch.equal(y, sampling.augment(x, torch.Generator().manual_seed(6)))
    dropped = y.abs() < 50  # noise ~N(0, 1) lands far from the 100..101 signal
    assert torch.equal(dropped[0], dropped[1])  # boxes cover all channels
    assert 0 < dropped[0].float().mean() <= 0.3 + 0.25 ** 3
    assert 0.7 < y[dropped].std() < 1.3 and abs(y[dropped].mean()) < 0.2
    for c in range(2):  # kept voxels are an affine map of the input: a x + b
        keep = ~dropped[c]
        xs, ys = x[c][keep].double(), y[c][keep].double()
        a = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
        b = ys.mean() - a * xs.mean()
        assert 0.9 <= a <= 1.1 and -0.1 <= b <= 0.1
        assert (a * xs + b - ys).abs().max() < 1e-4
    batch = sampling.augment(torch.stack([x, x]), torch.Generator().manual_seed(5))
    assert torch.equal(batch[0], y)


# ---------------------------------------------------------------------------------------------
# Crops


def _toy_volume(shape=(40, 40, 40), blob=(slice(30, 32), slice(4, 6), slice(20, 22)), ct=False):
    image = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[blob] = 4
    record = {"pad_value": [-1.0 if ct else 0.0, 0.0]}
    return data.Volume("toy", image, np.ones(shape, bool), label, record, dict(data.LABELS["brats"][1]))


def test_crop_sizes_and_foreground_ratio():
    vol = _toy_volume()
    roi = 16
    # brute-force probability that a uniformly placed crop contains the blob
    starts = [range(0, 40 - roi + 1)] * 3
    hit = sum(all(s <= lo and hi <= s + roi for s, lo, hi in zip(st, (30, 4, 20), (32, 6, 22)))
              for st in itertools.product(*starts))
    p_uniform = hit / 25 ** 3
    for fraction in (0.0, 0.5, 1.0):
        ds = sampling.CropDataset([vol], roi, fg_fraction=fraction, samples_per_epoch=300, seed=3)
        with_tumour = 0
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].shape == (2, roi, roi, roi) and s["regions"].shape == (3, roi, roi, roi)
            assert s["fg"].shape == (1, roi, roi, roi) and s["fg"].dtype == torch.bool
            st = s["start"].tolist()
            sl = tuple(slice(a, a + roi) for a in st)
            assert np.array_equal(s["image"].numpy(), vol.image[(slice(None), *sl)])
            assert torch.equal(s["regions"][1], torch.from_numpy(vol.label[sl] > 0).float())
            with_tumour += bool(s["regions"][1].any())
        expect = fraction + (1 - fraction) * p_uniform
        assert abs(with_tumour / len(ds) - expect) < 0.08, (fraction, with_tumour / len(ds), expect)
    epoch0 = [ds[i]["start"].tolist() for i in range(20)]
    assert epoch0 == [ds[i]["start"].tolist() for i in range(20)]  # same epoch, same crops
    ds.set_epoch(1)
    assert epoch0 != [ds[i]["start"].tolist() for i in range(20)]


def test_a_group_is_cropped_at_one_relative_position():
    """CropDataset.crop(i, group): every volume cropped at the group's relative position u, start =
    round(u (n - roi)), whatever its shape, sample index or epoch; u uniform, its own per group;
    EpochIndexed hands (epoch, index, group) to it."""
    a, b = _toy_volume(), _toy_volume(shape=(28, 52, 30), blob=(slice(2, 4), slice(4, 6), slice(20, 22)))
    roi = 16
    ds = sampling.CropDataset([a, b], roi, fg_fraction=1.0, samples_per_epoch=8, seed=3)
    spans = [np.array(v.fg.shape) - roi for v in (a, b)]
    places = set()
    for group in range(6):
        crops = [ds.crop(i, group) for i in range(4)]  # a, b, a, b
        starts = [c["start"].numpy() for c in crops]
        assert np.array_equal(starts[0], starts[2]) and np.array_equal(starts[1], starts[3])
        u = [st / span for st, span in zip(starts[:2], spans)]
        assert np.all(np.abs(u[0] - u[1]) <= 0.5 / spans[0] + 0.5 / spans[1] + 1e-9), (group, u)
        for c, v in zip(crops[:2], (a, b)):
            box = tuple(slice(q, q + roi) for q in c["start"].tolist())
            assert np.array_equal(c["image"].numpy(), v.image[(slice(None), *box)])
        ds.set_epoch(1)
        assert np.array_equal(ds.crop(1, group)["start"].numpy(), starts[1])
        ds.set_epoch(0)
        places.add(tuple(starts[1]))
    assert len(places) == 6
    mean = np.mean([ds.crop(0, g)["start"].numpy() / spans[0] for g in range(400)], axis=0)
    assert np.all(np.abs(mean - 0.5) < 0.06), mean
    e = R.EpochIndexed(ds)
    assert np.array_equal(e[(0, 1, 2)]["start"].numpy(), ds.crop(1, 2)["start"].numpy())
    assert np.array_equal(e[(0, 1)]["start"].numpy(), ds[1]["start"].numpy())
    assert not np.array_equal(ds[1]["start"].numpy(), ds[3]["start"].numpy())  # without a group: its own


def test_step_sampler_names_the_step_of_every_sample():
    """StepSampler(shared=True): the (epoch, index) pairs of the plain sampler, each with its global
    step; from a resumed step, the tail of the same sequence."""
    plain = list(R.StepSampler(5, 2, 6, seed=1, rank=1, world=2))
    shared = list(R.StepSampler(5, 2, 6, seed=1, rank=1, world=2, shared=True))
    assert [k[:2] for k in shared] == plain
    assert [k[2] for k in shared] == [s for s in range(6) for _ in range(2)]
    assert list(R.StepSampler(5, 2, 6, start=4, seed=1, rank=1, world=2, shared=True)) == shared[8:]


def test_crop_padding_when_volume_is_small():
    vol = _toy_volume(shape=(10, 40, 12), blob=(slice(2, 4), slice(10, 12), slice(3, 5)), ct=True)
    ds = sampling.CropDataset([vol], (16, 16, 16), fg_fraction=1.0, samples_per_epoch=4)
    s = ds[0]
    st = s["start"].tolist()
    assert st[0] == -3 and st[2] == -2  # centred padding on the short axes
    img = s["image"].numpy()
    assert (img[0, :3] == -1).all() and (img[0, 13:] == -1).all()  # CT pads with air
    assert (img[1, :3] == 0).all() and not s["fg"][0, :3].any() and s["fg"][0, 3:13, :, 2:14].all()
    assert np.array_equal(img[:, 3:13, :, 2:14], vol.image[:, :, st[1]:st[1] + 16, :])


def test_crop_dataset_workers_and_distributed_sampler():
    vol = _toy_volume()
    ds = sampling.CropDataset([vol, vol], 8, fg_fraction=0.5, samples_per_epoch=12, seed=0)
    single = sorted(tuple(ds[i]["start"].tolist()) + (i,) for i in range(12))
    got = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler, num_workers=2)
        idx = list(sampler)
        starts = [tuple(s) for b in loader for s in b["start"].tolist()]
        assert len(starts) == len(idx) == 6
        got += [s + (i,) for s, i in zip(starts, idx)]
    assert sorted(got) == single
