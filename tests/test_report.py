"""report.py: the paper's tables from known rows, the three files of write_table, and the
figures' sizes and PCA against numpy's SVD."""
import itertools
import json

import numpy as np
import pytest
import torch
from conftest import png_size, smooth

import report


def test_tables_and_write_table(tmp_path):
    rng = np.random.default_rng(2)
    mods = ["t1", "t1ce", "t2", "flair"]
    results = [{"case": f"c{i}", "source": s, "target": t, "psnr": rng.uniform(20, 40), "nmse": rng.uniform(0, 0.2),
                "ssim": rng.uniform(0.8, 1)} for i in range(4) for s in mods for t in mods]
    rows = report.transfer_matrix_table(results)
    assert [(r["source"], r["stat"]) for r in rows][:2] == [("T1", "mean"), ("T1", "std")] and len(rows) == 8
    sel = [r["psnr"] for r in results if r["source"] == "t2" and r["target"] == "flair"]
    assert rows[4]["Flair PSNR"] == pytest.approx(np.mean(sel))
    assert rows[5]["Flair PSNR"] == pytest.approx(np.std(sel, ddof=1))
    summary = report.transfer_summary_table(results)
    sel = [r["ssim"] for r in results if (r["source"], r["target"]) == ("t1", "t2")]
    assert summary[0]["T1->T2 SSIM"] == pytest.approx(np.mean(sel))
    assert summary[0]["T1->T2 SSIM std"] == pytest.approx(np.std(sel, ddof=1))

    seg = []
    for k in range(1, 5):
        for sub in itertools.combinations(mods, k):
            for case in range(2):
                d = {r: rng.uniform(0.5, 0.9) for r in report.REGIONS}
                seg.append({"case": case, "subset": sub, **d, "empty_truth": ["ET"] if case else []})
    table = report.missing_modality_table(seg)
    assert len(table) == 16 and table[0]["T1"] == "x" and table[0]["T2"] == "" and table[-1]["subset"] == "mean"
    assert table[4]["subset"] == "T1+T1ce" and table[-2]["subset"] == "T1+T1ce+T2+Flair"
    assert table[-1]["ET"] == pytest.approx(np.mean([r["ET"] for r in table[:-1]]))
    assert table[0]["WT"] == pytest.approx(100 * np.mean([r["WT"] for r in seg if r["subset"] == ("t1",)]))
    assert table[-1]["empty truth"] == 15

    meta = {"protocol": "reference", "policy": "brats", "seed": 0, "config": {"roi": [96, 96, 96]}}
    paths = report.write_table(summary, None, tmp_path / "table9", meta)
    assert [p.suffix for p in paths] == [".md", ".csv", ".json"] and all(p.exists() for p in paths)
    md = paths[0].read_text()
    assert " ± " in md and "T1->T2 PSNR std" not in md
    data = json.loads(paths[2].read_text())
    assert data["meta"]["protocol"] == "reference" and data["meta"]["seed"] == 0 and data["meta"]["commit"]
    assert data["rows"][0]["T1->T2 PSNR"] == pytest.approx(summary[0]["T1->T2 PSNR"])
    csv_lines = paths[1].read_text().splitlines()
    assert csv_lines[0].split(",")[0] == "method" and len(csv_lines) == 2
    with pytest.raises(ValueError, match="lacks columns"):
        report.write_table(summary, ["method", "nope"], tmp_path / "bad", meta)
    assert not list(tmp_path.glob("bad*"))


def test_figures_and_pca(tmp_path):
    rng = np.random.default_rng(4)
    vol = smooth((20, 24, 16)).astype(np.float32)
    preds = [vol + 0.1 * rng.standard_normal(vol.shape).astype(np.float32) for _ in range(3)]
    path = report.figure_transfer(tmp_path / "t.png", vol, preds, [vol] * 3, ["t1ce", "t2", "flair"], "t1")
    assert png_size(path) == (12 * 160, 3 * 160)
    label = np.zeros(vol.shape, np.uint8)
    label[5:12, 6:15, 4:10] = 2
    label[7:10, 8:12, 5:8] = 4
    path = report.figure_segmentation(tmp_path / "s.png", vol, np.roll(label, 1, 0), label)
    assert png_size(path) == (3 * 220, 2 * 220)
    feats = rng.standard_normal((24, 7)) + np.repeat(np.eye(7)[:2] * 4, 12, 0)
    xy = report.pca(feats).numpy()
    c = feats - feats.mean(0)
    u, s, vt = np.linalg.svd(c, full_matrices=False)
    ref = c @ vt[:2].T
    for k in range(2):
        assert np.allclose(np.abs(xy[:, k]), np.abs(ref[:, k]), atol=1e-10)
        assert np.allclose(xy[:, k], ref[:, k]) or np.allclose(xy[:, k], -ref[:, k])
    people = [f"p{i // 2}" for i in range(24)]
    path = report.figure_embedding(tmp_path / "e.png", torch.from_numpy(feats), ["ct", "pet"] * 12, people)
    assert png_size(path) == (400, 400)
    with pytest.raises(ValueError, match="labels"):
        report.figure_embedding(tmp_path / "x.png", feats, ["ct"], ["p0"])
