import itertools
import os
import struct
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# under pytest-xdist (make test) each worker process gets its share of the cores: two workers of
# two threads each on 2 cores would contend for them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


# the longest tests first: make test spreads the suite over processes (pytest-xdist), and a long
# test collected last would run alone at the end
LONGEST_FIRST = ("test_study.py::test_study_runs_on_a_tiny_budget", "test_kernels.py::test_prior_attention_roi96",
                 "test_kernels.py::test_window_full", "test_kernels.py::test_shift_mask_never_materialised")


def pytest_collection_modifyitems(config, items):
    rank = lambda item: next((i for i, name in enumerate(LONGEST_FIRST) if name in item.nodeid), len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: the order within each group stays


def smooth(shape, passes=4, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape)
    for axis, _ in itertools.product(range(3), range(passes)):
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    return x


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def write_brats(root, n=5, shape=(36, 40, 34), seed=0, convention="brats"):
    """Tiny BraTS-layout cases: an ellipsoid 'brain' whose tissues differ per modality, a
    spherical tumour (necrosis 1, oedema 2, enhancing 4 or 3) in most cases."""
    rng = np.random.default_rng(seed)
    names = ("t1", "t1ce", "t2", "flair") if convention == "brats" else ("t1n", "t1c", "t2w", "t2f")
    sep, et = ("_", 4) if convention == "brats" else ("-", 3)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    centre = np.array(shape) / 2
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    for c in range(n):
        case = f"Case_{c:03d}"
        d = root / case
        d.mkdir(parents=True)
        radii = np.array(shape) * rng.uniform(0.35, 0.42, 3)
        brain = (((grid - centre) / radii) ** 2).sum(-1) < 1
        label = np.zeros(shape, np.uint8)
        if c % 5 != 4:
            tc = centre + rng.uniform(-4, 4, 3)
            r = np.linalg.norm(grid - tc, axis=-1)
            label[(r < 8) & brain] = 2
            label[r < 5] = et
            label[r < 3] = 1
        tissue = brain.astype(np.float32) * (1 + 0.3 * np.sin(grid[..., 0] / 3 + c))
        for k, m in enumerate(names):
            img = tissue * (100 + 40 * k) + (label > 0) * (30 * (k + 1)) + rng.normal(0, 3, shape) * brain
            nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(d / f"{case}{sep}{m}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(d / f"{case}{sep}seg.nii.gz"))
    return root


def make_oblique(case_dir, angle=20.0):
    """Rewrites a case with its axes permuted (x, y, z) -> (z, x, y) and its grid rotated in
    world space: the same voxels on an oblique, non-RAS grid."""
    a, b = np.deg2rad(angle), np.deg2rad(angle / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    for f in sorted(case_dir.iterdir()):
        img = nib.load(str(f))
        arr = np.asarray(img.dataobj)
        perm = np.zeros((4, 4))  # voxel (k, i, j) of the new array -> (i, j, k) of the old one
        perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1
        rot = np.eye(4)
        rot[:3, :3] = rx @ rz
        affine = rot @ img.affine @ perm
        affine[:3, 3] += [3.5, -7.25, 11.0]
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 0, 1)), affine), str(f))


def write_autopet(root, shape=(30, 28, 60), seed=0, n=3):
    """Tiny AutoPET-layout cases (CT in HU, PET in SUV, 0/1 lesion), patient 1 without a lesion."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    centre = np.array(shape) / 2
    for c in range(n):
        d = root / f"pat{c}" / "study_0"
        d.mkdir(parents=True)
        body = (((grid - centre) / (np.array(shape) * 0.4)) ** 2).sum(-1) < 1
        lesion = np.zeros(shape, np.uint8)
        if c != 1:
            lesion[np.linalg.norm(grid - centre - rng.uniform(-3, 3, 3), axis=-1) < 4] = 1
        ct = np.where(body, 40 + rng.normal(0, 20, shape), -1000)
        pet = body * (1 + rng.random(shape)) + 8 * lesion
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        for name, a in (("CTres", ct.astype(np.float32)), ("SUV", pet.astype(np.float32)), ("SEG", lesion)):
            nib.save(nib.Nifti1Image(a, affine), str(d / f"{name}.nii.gz"))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny volumes: on a busy 2-core machine the thread
    pool costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_brats(tmp_path_factory):
    return write_brats(tmp_path_factory.mktemp("brats"))
