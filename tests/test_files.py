"""files.py: writes appear whole or not at all, JSON never holds NaN, checkpoints are read
weights-only with one-line errors naming the file."""
import json
import math

import numpy as np
import pytest
import torch

import files


def no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_write_json_has_no_nan_or_infinity(tmp_path):
    obj = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "np": np.float32(0.5), "t": torch.tensor(3),
           "tuple": (1, np.int64(2)), "path": tmp_path, "nested": [{"x": float("nan")}]}
    path = files.write_json(tmp_path / "a" / "r.json", obj)
    back = json.loads(path.read_text(), parse_constant=no_constants)
    assert back == {"nan": None, "inf": "inf", "-inf": "-inf", "np": 0.5, "t": 3, "tuple": [1, 2],
                    "path": str(tmp_path), "nested": [{"x": None}]}


def test_atomic_writes_all_targets_or_none(tmp_path):
    a, b = tmp_path / "t.md", tmp_path / "t.csv"
    a.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic(a, b) as (ta, tb):
            ta.write_text("new")
            tb.write_text("new")
            raise RuntimeError("fails after writing")
    assert a.read_text() == "old" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.md"]  # no temporary file left
    with files.atomic(a, b) as (ta, tb):
        assert ta.name.endswith(".md") and tb.name.endswith(".csv")  # writers pick the format by the ending
        ta.write_text("A")
        tb.write_text("B")
    assert (a.read_text(), b.read_text()) == ("A", "B")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]


def test_atomic_dir_replaces_a_folder_and_clears_leftovers(tmp_path):
    dest = tmp_path / "entry"
    dest.mkdir()
    (dest / "old.npy").write_text("x")
    (tmp_path / ".entry.999.1.tmp").mkdir()  # left by a builder that died
    with pytest.raises(RuntimeError):
        with files.atomic_dir(dest) as tmp:
            (tmp / "new.npy").write_text("y")
            raise RuntimeError
    assert [p.name for p in dest.iterdir()] == ["old.npy"]
    with files.atomic_dir(dest) as tmp:
        (tmp / "new.npy").write_text("y")
    assert [p.name for p in dest.iterdir()] == ["new.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_checkpoints_round_trip_and_fail_in_one_line(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "step": 3, "arch": {"kind": "swinunetr"}}
    path = files.save_checkpoint(tmp_path / "last.pt", state)
    back = files.read_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["model"]["w"], state["model"]["w"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: unreadable weights-only checkpoint") as e:
        files.read_checkpoint(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.pt: checkpoint not found"):
        files.read_checkpoint(tmp_path / "missing.pt")


class Unsafe:  # a pickled class: weights-only loading must refuse it
    pass


def test_read_checkpoint_refuses_arbitrary_objects(tmp_path):
    torch.save({"obj": Unsafe()}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="unsafe.pt"):
        files.read_checkpoint(tmp_path / "unsafe.pt")


def test_staging_moves_everything_or_nothing(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("old")
    with pytest.raises(RuntimeError):
        with files.staging(out) as stage:
            (stage / "results.json").write_text("new")
            raise RuntimeError
    assert (out / "results.json").read_text() == "old"
    with files.staging(out) as stage:
        (stage / "nifti" / "c0").mkdir(parents=True)
        (stage / "nifti" / "c0" / "seg.nii.gz").write_text("s")
        (stage / "results.json").write_text("new")
    assert (out / "results.json").read_text() == "new" and (out / "nifti" / "c0" / "seg.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_replace_section_changes_only_its_section_and_refuses_a_file_without_it(tmp_path):
    p = tmp_path / "doc.md"
    begin, end = files.section_markers("bench-x")
    p.write_text(f"head\n{begin}\nold 1.0\n{end}\ntail with {begin.replace('x', 'y')}\n")
    files.replace_section(p, "bench-x", "new 2.0\n")
    assert p.read_text() == f"head\n{begin}\nnew 2.0\n{end}\ntail with {begin.replace('x', 'y')}\n"
    files.replace_section(p, "bench-x", "new 3.0")  # a rerun replaces, never appends
    assert p.read_text().count("new") == 1 and "new 3.0" in p.read_text()
    for text in ("no markers\n", f"{end}\n{begin}\n", f"{begin}\n{end}\n{begin}\n{end}\n"):
        p.write_text(text)
        with pytest.raises(SystemExit, match="doc.md: expected one"):
            files.replace_section(p, "bench-x", "new")
        assert p.read_text() == text
