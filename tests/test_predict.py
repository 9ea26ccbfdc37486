"""predict.py on tiny synthetic cases: outputs on the input's grid (an oblique 1 mm case with a
checkpoint tuned at 2 mm, checked against scipy's zoom of the 2 mm prediction), CT / PET outputs in
HU / SUV by the inverse of the normalisation, every subset of the inputs equal to the Python
inference from the full case, batch mode on a mixed folder, and bad input stopping with one line
and no file."""
import gzip
import itertools
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_oblique, write_autopet, write_brats
from scipy import ndimage

import data
import layouts
import inference
import predict as P
import train_downstream as T

TINY = ["--feature-size", "12", "--roi", "32,32,64", "--prior-heads", "2", "--workers", "0"]
SHAPE = (30, 28, 60)
BRATS = ("t1", "t1ce", "t2", "flair")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """BraTS cases at 2 mm (Case_002 oblique), seg and transfer checkpoints on all four
    modalities, a PET/CT transfer checkpoint (random initial weights in the real format; the seg
    head starts at bias 0 so that every label value appears)."""
    tmp = tmp_path_factory.mktemp("predict")
    root = write_brats(tmp / "brats", n=3, shape=SHAPE, seed=1)
    make_oblique(root / "Case_002")
    petct = write_autopet(tmp / "autopet", SHAPE)
    ckpts = {}
    for name, src, task, extra in (("seg", root, "seg", ["--head-prior", "0.5"]), ("transfer", root, "transfer", []),
                                   ("petct", petct, "transfer", [])):
        T.main(["--data", str(src), "--out", str(tmp / name), "--task", task, "--max-steps", "0",
                "--val-fraction", "0", "--cache", str(tmp / "cache"), *TINY, *extra])
        ckpts[name] = tmp / name / "last.pt"
    return tmp, root, petct, ckpts


def call(argv, capsys):
    """predict.main in this process: (exit status, stderr lines), as the command line gives them."""
    capsys.readouterr()
    try:
        code = P.main([*argv, "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err
    except SystemExit as e:
        err = capsys.readouterr().err + (f"{e.code}\n" if isinstance(e.code, str) else "")
        code = 1 if isinstance(e.code, str) else e.code
    return code, [line for line in err.splitlines() if line.strip()]


def files(case_dir, case, names=BRATS):
    return [f"{m}={case_dir / f'{case}_{m}.nii.gz'}" for m in names]


def expected(net, meta, vol, subset, role):
    """The outputs predict.py should write, from the Python inference on the full case: target
    modalities (MRI masked to the brain, in the data's units) or the label map, on the source grid."""
    out = inference.predict(net, torch.from_numpy(np.array(vol.image)), subset, meta)
    if role == "seg":
        regions = dict(meta["region_values"])
        return {"seg.nii.gz": data.restore(data.regions_to_label((out > 0).numpy(), regions), vol.record)}
    fg = np.asarray(vol.fg)
    return {m: data.restore(out[k].numpy() * fg, vol.record) for k, m in enumerate(meta["targets"]) if m not in subset}


def test_every_subset_of_inputs_matches_the_inference_from_the_full_case(setup, tmp_path, capsys):
    tmp, root, _, ckpts = setup
    case = root / "Case_000"
    spec = layouts.resolve(root)
    vol = data.load_case(spec.case("Case_000"), spec, use_cache=False)
    nets = {r: inference.load_tuned(ckpts[r]) for r in ("seg", "transfer")}
    src = nib.load(str(case / "Case_000_t1.nii.gz"))
    for k in range(1, 5):
        for subset in itertools.combinations(BRATS, k):
            out = tmp_path / "+".join(subset)
            code, err = call(["--ckpt", str(ckpts["transfer"]), "--seg-ckpt", str(ckpts["seg"]), "--out", str(out),
                              *[a for f in files(case, "Case_000", subset) for a in ("--input", f)]], capsys)
            assert code == 0, err
            want = {**expected(*nets["transfer"], vol, list(subset), "transfer"),
                    **expected(*nets["seg"], vol, list(subset), "seg")}
            written = sorted(p.name for p in out.glob("*.nii.gz"))
            assert written == sorted(["seg.nii.gz", *[f"Case_000_{m}.nii.gz" for m in BRATS if m not in subset]])
            for name, ref in want.items():
                img = nib.load(str(out / (name if name.endswith(".gz") else f"Case_000_{name}.nii.gz")))
                assert img.shape == src.shape and np.allclose(img.affine, src.affine)
                got = np.asarray(img.dataobj)
                if name == "seg.nii.gz":
                    assert got.dtype == np.uint8 and np.array_equal(got, ref), subset
                    assert set(np.unique(got)) == {0, 1, 2, 4}  # the BraTS 2018-2021 convention
                else:
                    assert got.dtype == np.float32
                    np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{subset} {name}")
            report = json.loads((out / "report.json").read_text())
            assert report["checkpoints"]["transfer"]["inputs_used"] == list(subset)
            assert not report["checkpoints"]["seg"]["spacing"]["resampled"]


def test_oblique_1mm_case_with_a_2mm_checkpoint_comes_back_on_its_grid(setup, tmp_path, capsys):
    """Case_002 (oblique, axes permuted) upsampled to 1 mm by repeating each voxel: resampled to
    2 mm it is the 2 mm case again, so its outputs are the 2 mm outputs interpolated trilinearly
    onto the 1 mm grid (scipy.ndimage.zoom, order 1, as the reference), on that grid's affine."""
    tmp, root, _, ckpts = setup
    fine = tmp_path / "fine"
    fine.mkdir()
    half = np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25], [0, 0, 0, 1]])
    for m in ("t1", "t2"):
        img = nib.load(str(root / "Case_002" / f"Case_002_{m}.nii.gz"))
        a = np.asarray(img.dataobj)
        for axis in range(3):
            a = np.repeat(a, 2, axis)
        nib.save(nib.Nifti1Image(a, img.affine @ half), str(fine / f"Case_002_{m}.nii.gz"))
    inputs = ["--input", f"t1={fine / 'Case_002_t1.nii.gz'}"]
    coarse_inputs = ["--input", f"t1={root / 'Case_002' / 'Case_002_t1.nii.gz'}"]
    both = ["--ckpt", str(ckpts["transfer"]), "--seg-ckpt", str(ckpts["seg"]), "--save-probabilities"]
    assert call([*both, *inputs, "--out", str(tmp_path / "out1")], capsys)[0] == 0
    assert call([*both, *coarse_inputs, "--out", str(tmp_path / "out2")], capsys)[0] == 0
    ref = nib.load(str(fine / "Case_002_t1.nii.gz"))
    report = json.loads((tmp_path / "out1" / "report.json").read_text())
    coarse = json.loads((tmp_path / "out2" / "report.json").read_text())
    spacing = report["checkpoints"]["transfer"]["spacing"]
    assert spacing["resampled"] and spacing["case_mm"] == [1.0, 1.0, 1.0] and spacing["checkpoint_mm"] == [2.0] * 3
    assert spacing["model_shape"] == coarse["checkpoints"]["transfer"]["spacing"]["model_shape"]
    brain = np.asarray(ref.dataobj) != 0
    inner = ndimage.binary_erosion(brain, iterations=3)
    for name in ("Case_002_t1ce.nii.gz", "Case_002_t2.nii.gz", "Case_002_flair.nii.gz", "seg.nii.gz",
                 "seg_probabilities.nii.gz"):
        img = nib.load(str(tmp_path / "out1" / name))
        assert img.shape[:3] == ref.shape and np.allclose(img.affine, ref.affine), name
        assert img.get_data_dtype() == (np.uint8 if name == "seg.nii.gz" else np.float32)
    for name in ("Case_002_t2.nii.gz", "Case_002_flair.nii.gz"):
        got = np.asarray(nib.load(str(tmp_path / "out1" / name)).dataobj)
        low = np.asarray(nib.load(str(tmp_path / "out2" / name)).dataobj)
        want = ndimage.zoom(low, 2, order=1, mode="nearest", grid_mode=True)
        assert np.abs(got - want)[inner].max() < 1e-4, name
        assert np.all(got[~brain] == 0)  # MRI is 0 outside the brain
    code, err = call([*both, *inputs, "--out", str(tmp_path / "out3"), "--no-resample"], capsys)
    assert code == 1 and not (tmp_path / "out3").exists()
    assert "Case_002_t1.nii.gz: spacing 1x1x1 mm" in err[0] and "checkpoint's 2x2x2 mm" in err[0], err


def test_ct_and_pet_outputs_are_in_hu_and_suv(setup, tmp_path, capsys):
    x = np.random.default_rng(0).uniform(-1500, 2500, (4, 5, 6)).astype(np.float32)
    out = np.empty_like(x)
    data._normalise(x, "ct", out)
    np.testing.assert_allclose(data.denormalise(out, "ct"), np.clip(x, -1000, 1000), atol=1e-3)
    suv = np.random.default_rng(1).uniform(-1, 30, (4, 5, 6)).astype(np.float32)
    data._normalise(suv, "pet", out)
    np.testing.assert_allclose(data.denormalise(out, "pet"), np.maximum(suv, 0), rtol=1e-6, atol=1e-6)

    tmp, _, petct, ckpts = setup
    net, meta = inference.load_tuned(ckpts["petct"])
    study = petct / "pat0" / "study_0"
    for given, made, target in (("pet", "CTres", "ct"), ("ct", "SUV", "pet")):
        dest = tmp_path / given
        src = study / f"{'SUV' if given == 'pet' else 'CTres'}.nii.gz"
        code, err = call(["--ckpt", str(ckpts["petct"]), "--input", f"{given}={src}", "--out", str(dest)], capsys)
        assert code == 0, err
        case = layouts.Case("pat0", {given: src})
        vol = data.load_case(case, layouts.DatasetSpec(study, "x", [given], [case], None), use_cache=False)
        y = inference.predict(net, {given: torch.from_numpy(np.array(vol.image[0]))}, [given], meta)
        y = y[meta["targets"].index(target)].numpy()
        physical = (np.clip(y, -1, 1) + 1) * 1000 - 1000 if target == "ct" else np.maximum(y, 0) * 10
        want = data.restore(physical, vol.record, -1000.0 if target == "ct" else 0.0)
        img = nib.load(str(dest / f"{made}.nii.gz"))
        np.testing.assert_allclose(np.asarray(img.dataobj), want, atol=1e-3)
        report = json.loads((dest / "report.json").read_text())
        assert report["outputs"][f"{made}.nii.gz"]["unit"].startswith("HU" if target == "ct" else "SUV")


def test_input_dir_finishes_good_cases_reports_broken_ones_and_resumes(setup, tmp_path, capsys):
    tmp, root, _, ckpts = setup
    scans = tmp_path / "scans"
    shutil.copytree(root, scans)
    (scans / "Case_002" / "Case_002_t1ce.nii.gz").unlink()  # BraSyn-like: modalities missing
    (scans / "Case_002" / "Case_002_t2.nii.gz").unlink()
    bad = scans / "Case_001" / "Case_001_t1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated gzip
    out = tmp_path / "out"
    argv = ["--ckpt", str(ckpts["transfer"]), "--seg-ckpt", str(ckpts["seg"]), "--input-dir", str(scans),
            "--out", str(out), "--preview"]
    code, err = call(argv, capsys)
    assert code == 1
    errors = [e for e in err if e.startswith("error:")]
    assert len(errors) == 1 and "Case_001" in errors[0] and str(bad) in errors[0], err
    assert sorted(p.name for p in out.iterdir()) == ["Case_000", "Case_002"]  # nothing for the broken case
    assert sorted(p.name for p in (out / "Case_002").iterdir()) == sorted(
        ["Case_002_t1ce.nii.gz", "Case_002_t2.nii.gz", "seg.nii.gz", "preview.png", "report.json"])
    assert sorted(p.name for p in (out / "Case_000").iterdir()) == ["preview.png", "report.json", "seg.nii.gz"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    stamp = (out / "Case_000" / "report.json").stat().st_mtime_ns
    code, err = call(argv, capsys)
    assert code == 1 and "skipped 2 finished" in err[-1]
    assert (out / "Case_000" / "report.json").stat().st_mtime_ns == stamp
    code, err = call([*argv, "--overwrite"], capsys)
    assert code == 1 and (out / "Case_000" / "report.json").stat().st_mtime_ns != stamp


def test_brats2023_folder_gets_its_own_file_names(setup, tmp_path, capsys):
    _, _, _, ckpts = setup
    scans = write_brats(tmp_path / "brasyn", n=1, shape=SHAPE, seed=3, convention="brats2023")
    (scans / "Case_000" / "Case_000-t2f.nii.gz").unlink()
    (scans / "Case_000" / "Case_000-seg.nii.gz").unlink()
    code, err = call(["--ckpt", str(ckpts["transfer"]), "--input-dir", str(scans), "--out", str(tmp_path / "o")],
                     capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o" / "Case_000").iterdir()) == ["Case_000-t2f.nii.gz", "report.json"]


def test_nnunet_images_ts_folder_numbers_the_outputs_by_channel(setup, tmp_path, capsys):
    """A folder of <id>_000k files: channel k is the checkpoint's k-th modality (t1, t1ce, t2,
    flair), the generated ones get the numbers of the missing channels."""
    _, root, _, ckpts = setup
    scans = tmp_path / "imagesTs"
    scans.mkdir()
    for k, m in ((0, "t1"), (2, "t2")):
        shutil.copy(root / "Case_001" / f"Case_001_{m}.nii.gz", scans / f"p7_{k:04d}.nii.gz")
    code, err = call(["--ckpt", str(ckpts["transfer"]), "--seg-ckpt", str(ckpts["seg"]), "--input-dir", str(scans),
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o" / "p7").iterdir()) == [
        "p7_0001.nii.gz", "p7_0003.nii.gz", "report.json", "seg.nii.gz"]
    report = json.loads((tmp_path / "o" / "p7" / "report.json").read_text())
    assert report["checkpoints"]["transfer"]["inputs_used"] == ["t1", "t2"]


def _bad_inputs(tmp, root, ckpts):
    """(name, argv, the file the message must name, words it must hold) for each bad input."""
    case = root / "Case_000"
    t1 = f"t1={case / 'Case_000_t1.nii.gz'}"
    img = nib.load(str(case / "Case_000_t1.nii.gz"))
    a = np.asarray(img.dataobj).astype(np.float32)
    text = tmp / "text.nii.gz"
    text.write_bytes(gzip.compress(b"not an image"))
    four = tmp / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([a, a], -1), img.affine), str(four))
    nan = tmp / "nan.nii.gz"
    a[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(a, img.affine), str(nan))
    other = tmp / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), img.affine), str(other))
    ck = ["--ckpt", str(ckpts["transfer"])]
    return [
        ("missing file", [*ck, "--input", f"t1={tmp / 'nope.nii.gz'}"], tmp / "nope.nii.gz", "missing"),
        ("not NIfTI", [*ck, "--input", f"t1={text}"], text, "not a readable NIfTI"),
        ("4-D image", [*ck, "--input", f"t1={four}"], four, "4-D"),
        ("NaN", [*ck, "--input", f"t1={nan}"], nan, "NaN"),
        ("two grids", [*ck, "--input", t1, "--input", f"t2={other}"], other, "Case_000_t1.nii.gz"),
        ("wrong checkpoint", ["--ckpt", str(ckpts["seg"]), "--input", t1], ckpts["seg"], "seg checkpoint"),
        ("corrupt checkpoint", ["--ckpt", str(text), "--input", t1], text, "checkpoint"),
        ("unknown modality", [*ck, "--input", f"dwi={case / 'Case_000_t1.nii.gz'}"], "dwi", "t1, t1ce, t2, flair"),
    ]


@pytest.mark.parametrize("which", range(8))
def test_bad_input_gives_one_line_and_no_file(setup, tmp_path, capsys, which):
    tmp, root, _, ckpts = setup
    name, argv, named, words = _bad_inputs(tmp_path, root, ckpts)[which]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = call([*argv, "--out", str(out)], capsys)
    assert code == 1, name
    errors = [e for e in err if not e.startswith("predicted ")]
    assert len(errors) == 1 and str(named) in errors[0] and words in errors[0], (name, err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before, name
