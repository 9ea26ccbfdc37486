"""evaluate.py's command line on tiny synthetic BraTS cases: tables with the right rows, NIfTI
outputs on the input's grid (an oblique, axis-permuted case included) checked voxel by voxel
against a brute-force mapping through the affines, Dice and transfer metrics recomputed from
the written files (scikit-image for PSNR / SSIM), label maps in the dataset's convention, and
bad input (modality order, a corrupt file) stopping with one line and no output."""
import itertools
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_oblique, write_autopet, write_brats
from skimage.measure import label as components

import data
import layouts
import evaluate as E
import inference
import metrics
import train_downstream as T

TINY = ["--feature-size", "12", "--roi", "32,32,64", "--prior-heads", "2", "--workers", "0"]
SHAPE = (30, 28, 60)  # the brain crop fits one 32 x 32 x 64 window


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """Three cases (Case_002 oblique) and a seg and a transfer checkpoint of train_downstream
    (no optimizer step: the random initial weights, saved in the real checkpoint format)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    root = write_brats(tmp / "brats", n=3, shape=SHAPE, seed=1)
    make_oblique(root / "Case_002")
    cache = tmp / "cache"
    ckpts = {}
    for task in ("seg", "transfer"):
        T.main(["--data", str(root), "--out", str(tmp / task), "--modalities", "t1,t2", "--task", task,
                "--max-steps", "0", "--val-fraction", "0", "--cache", str(cache), *TINY])
        ckpts[task] = tmp / task / "last.pt"
    return root, cache, ckpts


def run(setup, task, out, *extra):
    root, cache, ckpts = setup
    return E.main(["--ckpt", str(ckpts[task]), "--data", str(root), "--task", task, "--out", str(out),
                   "--cache", str(cache), "--device", "cpu", *extra])


def expected_on_source_grid(pre, record, src_shape):
    """Brute force: every voxel of the preprocessed grid sent through its affine into the
    source grid's voxel indices (not through data.restore)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in pre.shape], indexing="ij"), -1).reshape(-1, 3)
    to_src = np.linalg.inv(np.array(record["affine"])) @ np.array(record["affine_out"])
    src = np.rint(idx @ to_src[:3, :3].T + to_src[:3, 3]).astype(int)
    out = np.zeros(src_shape, pre.dtype)
    out[tuple(src.T)] = pre.reshape(-1)
    return out


def brats_label(tc, wt, et, et_value=4):
    lab = np.zeros(wt.shape, np.uint8)
    lab[wt] = 2
    lab[tc] = 1
    lab[et] = et_value
    return lab


def dice_by_hand(p, g):
    if not p.any() and not g.any():
        return 1.0
    return 2.0 * (p & g).sum() / (p.sum() + g.sum())


def test_seg_tables_nifti_on_source_grid_and_dice_from_written_files(setup, tmp_path, capsys):
    root, cache, ckpts = setup
    out = tmp_path / "seg"
    res = run(setup, "seg", out, "--split", "all", "--figures", "1")
    printed = capsys.readouterr().out
    assert "| T1+T2 | x | x |" in printed and "| mean |" in printed

    for ext in (".md", ".csv", ".json"):
        assert (out / f"table11_missing_modality{ext}").stat().st_size > 0
    table = json.loads((out / "table11_missing_modality.json").read_text())
    assert [r["subset"] for r in table["rows"]] == ["T1", "T2", "T1+T2", "mean"]
    assert [r["n"] for r in table["rows"]] == [3, 3, 3, 9]
    assert table["meta"]["policy"] == "brats" and table["meta"]["seed"] == 0 and table["meta"]["commit"]
    assert len(list(out.parent.glob(".seg.partial-*"))) == 0
    assert (out / "figures" / "Case_000_seg.png").stat().st_size > 1000
    assert not (out / "figures" / "Case_001_seg.png").exists()
    assert (out / "figures" / "embedding.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["cases"]) == ["Case_000", "Case_001", "Case_002"]

    net, meta = inference.load_tuned(ckpts["seg"])
    spec = layouts.resolve(root, ["t1", "t2"])
    dices = {r: [] for r in ("WT", "TC", "ET")}
    for cid in ("Case_000", "Case_001", "Case_002"):
        src_img = nib.load(str(root / cid / f"{cid}_t1.nii.gz"))
        written = nib.load(str(out / "nifti" / cid / f"{cid}_seg.nii.gz"))
        assert written.shape == src_img.shape
        np.testing.assert_array_equal(written.affine, src_img.affine)
        lab = np.asarray(written.dataobj)
        assert set(np.unique(lab).tolist()) <= {0, 1, 2, 4}

        if cid != "Case_001":  # the label map of all inputs: the model's regions sent to the source grid by hand
            vol = data.load_case(spec.case(cid), spec, cache)
            logits = inference.predict(net, torch.from_numpy(np.array(vol.image)), ["t1", "t2"], meta)
            tc, wt, et = (logits > 0).numpy()  # meta["regions"] order
            assert meta["regions"] == ["tc", "wt", "et"]
            want = expected_on_source_grid(brats_label(tc, wt, et), vol.record, src_img.shape)
            np.testing.assert_array_equal(lab, want)

        # Dice of the written map against the raw label file, WT {1,2,4}, TC {1,4}, ET {4}
        truth = np.asarray(nib.load(str(root / cid / f"{cid}_seg.nii.gz")).dataobj)
        row = next(r for r in results["cases"][cid] if r["subset"] == ["t1", "t2"])
        for region, values in (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))):
            d = dice_by_hand(np.isin(lab, values), np.isin(truth, values))
            assert row[region] == pytest.approx(d, abs=1e-12)
            dices[region].append(d)
            # lesion-wise numbers of the written map (metrics.lesion_metrics is checked against panoptica)
            spacing = nib.load(str(root / cid / f"{cid}_seg.nii.gz")).header.get_zooms()
            want = metrics.lesion_metrics(np.isin(lab, values), np.isin(truth, values), spacing)
            got = row["lesionwise"][region.lower()]
            assert {k: got[k] for k in ("n_ref", "n_pred", "tp")} == {k: want[k] for k in ("n_ref", "n_pred", "tp")}
            assert got["dice"] == pytest.approx(want["dice"], nan_ok=True)
    full = next(r for r in table["rows"] if r["subset"] == "T1+T2")
    for region, values in dices.items():
        assert full[region] == pytest.approx(100 * np.mean(values), abs=1e-9)
    assert res["tables"]["table11_missing_modality"] == out / "table11_missing_modality"
    lesion = json.loads((out / "table_lesionwise.json").read_text())
    assert [r["subset"] for r in lesion["rows"]] == ["T1", "T2", "T1+T2"] and "WT Dice" in lesion["rows"][0]


def test_transfer_tables_and_metrics_recomputed_from_written_nifti(setup, tmp_path):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    root, cache, ckpts = setup
    out = tmp_path / "transfer"
    run(setup, "transfer", out, "--protocol", "reference,strict,percentile", "--figures", "0")
    net, meta = inference.load_tuned(ckpts["transfer"])
    test_ids = meta["split"]["test"]
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["cases"]) == sorted(test_ids)
    assert results["meta"]["protocol"] == ["reference", "strict", "percentile"]
    assert not (out / "figures").exists()

    for protocol in ("reference", "strict", "percentile"):
        t10 = json.loads((out / f"table10_transfer_{protocol}.json").read_text())
        assert [(r["source"], r["stat"]) for r in t10["rows"]] == [("T1", "mean"), ("T1", "std"), ("T2", "mean"),
                                                                   ("T2", "std")]
        assert t10["meta"]["protocol"] == protocol
        t9 = json.loads((out / f"table9_transfer_{protocol}.json").read_text())
        assert [r["method"] for r in t9["rows"]] == ["ours"] and "T1->T2 PSNR" in t9["columns"]
        assert (out / f"table10_transfer_{protocol}.md").read_text().startswith("| source | stat |")

    for cid in test_ids:
        raw = {m: np.asarray(nib.load(str(root / cid / f"{cid}_{m}.nii.gz")).dataobj, np.float64) for m in ("t1", "t2")}
        fg = (raw["t1"] != 0) | (raw["t2"] != 0)
        rows = results["cases"][cid]
        for s, t in itertools.product(("t1", "t2"), repeat=2):
            path = out / "nifti" / cid / f"{cid}_{s}_to_{t}.nii.gz"
            img, src = nib.load(str(path)), nib.load(str(root / cid / f"{cid}_{t}.nii.gz"))
            assert img.shape == src.shape
            np.testing.assert_array_equal(img.affine, src.affine)
            p = np.asarray(img.dataobj, np.float64)
            g = raw[t].copy()
            nz = g != 0
            g[nz] = (g[nz] - g[nz].mean()) / g[nz].std()
            got = {r["protocol"]: r for r in rows if (r["source"], r["target"]) == (s, t)}

            ref = np.where(fg, (p - p[fg].mean()) / p[fg].std(), g)  # reference protocol by hand
            rng = max(np.ptp(ref), np.ptp(g))
            assert got["reference"]["psnr"] == pytest.approx(peak_signal_noise_ratio(g, ref, data_range=rng), abs=1e-4)
            assert got["reference"]["ssim"] == pytest.approx(structural_similarity(g, ref, data_range=rng), abs=1e-4)
            assert got["reference"]["nmse"] == pytest.approx(((ref - g) ** 2).sum() / (g ** 2).sum(), rel=1e-4)

            pv, gv = p[fg], g[fg]  # strict: foreground voxels only
            rng = max(np.ptp(pv), np.ptp(gv))
            assert got["strict"]["psnr"] == pytest.approx(peak_signal_noise_ratio(gv, pv, data_range=rng), abs=1e-4)
            x = raw[s].copy()  # identity baseline: the z-scored source as the prediction
            x[x != 0] = (x[x != 0] - x[x != 0].mean()) / x[x != 0].std()
            xv = x[fg]
            rng = max(np.ptp(xv), np.ptp(gv))
            want = peak_signal_noise_ratio(gv, xv, data_range=rng) if s != t else "inf"  # JSON spells inf so
            assert got["strict"]["identity_psnr"] == pytest.approx(want, abs=1e-4)
            assert got["strict"]["nmse"] == pytest.approx(((pv - gv) ** 2).sum() / (gv ** 2).sum(), rel=1e-4)

            def clip_scale(x):
                lo, hi = np.percentile(x, [0.5, 99.5])
                return (np.clip(x, lo, hi) - lo) / (hi - lo)
            pb, gb = clip_scale(p), clip_scale(g)
            assert got["percentile"]["psnr"] == pytest.approx(peak_signal_noise_ratio(gb, pb, data_range=1.0), abs=1e-4)
            assert got["percentile"]["ssim"] == pytest.approx(structural_similarity(gb, pb, data_range=1.0), abs=1e-4)

    t10 = json.loads((out / "table10_transfer_reference.json").read_text())
    by_hand = np.mean([r["psnr"] for cid in test_ids for r in results["cases"][cid]
                       if (r["source"], r["target"], r["protocol"]) == ("t1", "t2", "reference")])
    assert t10["rows"][0]["T2 PSNR"] == pytest.approx(by_hand, abs=1e-12)


def test_autopet_table8_from_written_label_maps(tmp_path):
    root = write_autopet(tmp_path / "autopet", SHAPE)
    T.main(["--data", str(root), "--out", str(tmp_path / "run"), "--task", "seg", "--max-steps", "0",
            "--val-fraction", "0", "--cache", str(tmp_path / "cache"), *TINY])
    out = tmp_path / "eval"
    E.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--data", str(root), "--out", str(out), "--split", "all",
            "--subsets", "given", "--figures", "0", "--cache", str(tmp_path / "cache")])
    table = json.loads((out / "table8_autopet.json").read_text())
    assert table["meta"]["policy"] == "autopet" and len(table["rows"]) == 1
    row = table["rows"][0]
    assert row["method"] == "CT+PET" and row["cases"] == 3
    t11 = json.loads((out / "table11_missing_modality.json").read_text())
    assert [r["subset"] for r in t11["rows"]] == ["CT+PET", "mean"] and t11["rows"][-1]["empty truth"] == 1

    # by hand from the written files: AutoPET Dice, case flags, 18-connected FP / FN volumes
    dices, flags, fp, fn = [], [], [], []
    for p in ("pat0", "pat1", "pat2"):
        src = nib.load(str(root / p / "study_0" / "SEG.nii.gz"))
        img = nib.load(str(out / "nifti" / p / f"{p}_seg.nii.gz"))
        assert img.shape == src.shape
        np.testing.assert_array_equal(img.affine, src.affine)
        pred, truth = np.asarray(img.dataobj), np.asarray(src.dataobj)
        assert set(np.unique(pred).tolist()) <= {0, 1}
        pred, truth = pred > 0, truth > 0
        if truth.any() or pred.any():
            dices.append(dice_by_hand(pred, truth))
        flags.append((truth.any(), pred.any()))

        def unmatched(a, b):
            lab = components(a, connectivity=2)
            return sum((lab == k).sum() for k in range(1, lab.max() + 1) if not (b & (lab == k)).any()) * 12 / 1000
        fp.append(unmatched(pred, truth))
        fn.append(unmatched(truth, pred))
    assert row["Dice"] == pytest.approx(100 * np.mean(dices), abs=1e-9)
    assert row["FP vol (mL)"] == pytest.approx(np.mean(fp), abs=1e-9)
    assert row["FN vol (mL)"] == pytest.approx(np.mean(fn), abs=1e-9)
    tp = sum(t and q for t, q in flags)
    assert row["TPR"] == pytest.approx(100 * tp / sum(t for t, _ in flags))


@pytest.mark.parametrize("kind", ["brats", "brats2023", "autopet"])
def test_regions_to_label_inverts_label_to_regions(kind):
    values, regions = data.LABELS[kind]
    rng = np.random.default_rng(0)
    label = rng.choice(np.array(values, np.uint8), size=(7, 6, 5))
    masks = data.label_to_regions(label, regions) > 0.5
    np.testing.assert_array_equal(data.regions_to_label(masks, regions), label)
    if kind != "autopet":  # overlapping predictions: the innermost region wins, by the BraTS rule
        tc, wt, et = rng.random((3, 7, 6, 5)) < 0.4
        et_value = 4 if kind == "brats" else 3
        np.testing.assert_array_equal(data.regions_to_label(np.stack([tc, wt, et]), regions),
                                      brats_label(tc, wt, et, et_value))
    with pytest.raises(ValueError, match="does not own exactly one label value"):
        data.regions_to_label(np.zeros((2, 3, 3, 3), bool), {"a": (1, 2), "b": (3, 4)})


def test_modality_order_mismatch_and_corrupt_file_stop_with_one_line_and_no_output(setup, tmp_path):
    root, cache, ckpts = setup
    out = tmp_path / "bad"
    with pytest.raises(SystemExit, match=r"modalities: checkpoint \['t1', 't2'\] != data \['t2', 't1'\]"):
        run(setup, "seg", out, "--modalities", "t2,t1")
    with pytest.raises(SystemExit, match="was tuned for transfer"):
        run(setup, "transfer", out, "--task", "seg")
    assert not out.exists()

    # a truncated file in the second case: the first case's outputs must not survive
    broken = tmp_path / "broken"
    for cid in ("Case_000", "Case_001"):
        shutil.copytree(root / cid, broken / cid)
    bad = broken / "Case_001" / "Case_001_t2.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(SystemExit) as err:
        E.main(["--ckpt", str(ckpts["seg"]), "--data", str(broken), "--out", str(out), "--split", "all",
                "--subsets", "given", "--figures", "0", "--cache", str(tmp_path / "cache")])
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg
    assert not out.exists() and not list(tmp_path.glob(".bad.partial-*"))


def test_brats2024_labels_through_check_training_and_evaluation(tmp_path, capsys):
    """BraTS 2024 keeps the BraTS 2023 file names and adds 4 = resection cavity: data.py check
    recognises it by its label 4, refuses the 4 when forced to BraTS 2023 (naming --labels
    brats2024) and accepts it with that flag; tuning records the convention and the RC region; the evaluation
    reads it back from the checkpoint, keeps RC out of WT / TC / ET and writes 0-4 label maps."""
    root = write_brats(tmp_path / "b24", n=3, shape=SHAPE, seed=5, convention="brats2023")
    for cid in ("Case_000", "Case_001"):
        path = root / cid / f"{cid}-seg.nii.gz"
        img = nib.load(str(path))
        lab = np.asarray(img.dataobj).copy()
        lab[13:17, 10:13, 36:42] = 4  # a cavity inside the brain, beside the tumour
        nib.save(nib.Nifti1Image(lab, img.affine), str(path))
    assert data.main(["check", "--data", str(root)]) == 0  # BraTS 2023 names with a 4: BraTS 2024
    assert "labels brats2024 recognised from label 4" in capsys.readouterr().err
    assert data.main(["check", "--data", str(root), "--labels", "brats2023"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("--labels brats2024" in line for line in out)
    assert data.main(["check", "--data", str(root), "--labels", "brats2024"]) == 0
    assert "labels brats2024" in capsys.readouterr().err
    T.main(["--data", str(root), "--out", str(tmp_path / "seg"), "--task", "seg", "--labels", "brats2024",
            "--modalities", "t1,t2", "--max-steps", "1", "--val-fraction", "0", "--test-fraction", "0.34",
            "--cache", str(tmp_path / "cache"), "--head-prior", "0.5", *TINY])  # bias 0: every label appears
    net, meta = inference.load_tuned(tmp_path / "seg" / "last.pt")
    assert meta["label_kind"] == "brats2024" and meta["regions"] == ["tc", "wt", "et", "rc"]
    assert meta["region_values"]["wt"] == [1, 2, 3] and meta["region_values"]["rc"] == [4]
    res = E.main(["--ckpt", str(tmp_path / "seg" / "last.pt"), "--data", str(root), "--task", "seg", "--split", "all",
                  "--out", str(tmp_path / "eval"), "--cache", str(tmp_path / "cache"), "--device", "cpu",
                  "--figures", "0", "--subsets", "given"])
    for cid, rows in json.loads((tmp_path / "eval" / "results.json").read_text())["cases"].items():
        lab = np.asarray(nib.load(str(tmp_path / "eval" / "nifti" / cid / f"{cid}_seg.nii.gz")).dataobj)
        truth = np.asarray(nib.load(str(root / cid / f"{cid}-seg.nii.gz")).dataobj)
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4}
        for region, values in (("wt", (1, 2, 3)), ("tc", (1, 3)), ("et", (3,)), ("rc", (4,))):
            p, g = np.isin(lab, values), np.isin(truth, values)
            want = 2 * (p & g).sum() / (p.sum() + g.sum()) if p.any() or g.any() else 1.0
            assert rows[0][region] == pytest.approx(want, abs=1e-12), (cid, region)
    assert "rc" in res["summary"]["t1+t2"]
