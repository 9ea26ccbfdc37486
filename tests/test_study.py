"""study.py: its statistics against hand-made cases, and the whole study on tiny data (smoke)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import study
from files import section_markers
from conftest import write_autopet, write_brats


def test_verdict_uses_twice_the_standard_error_of_the_paired_difference():
    # differences 1, 2, 3: mean 2, standard error 1 / sqrt(3) = 0.577 -> holds
    word, m, se = study.verdict([11, 12, 13], [10, 10, 10])
    assert word == "holds" and m == 2 and abs(se - 1 / math.sqrt(3)) < 1e-12
    assert study.verdict([10, 10, 10], [11, 12, 13])[0] == "does not hold"
    # differences 1, -1, 2: mean 0.667, standard error 0.882 -> within noise
    assert study.verdict([1, -1, 2], [0, 0, 0])[0] == "within noise"
    assert study.verdict([5.0], [1.0])[0] == "within noise"  # one seed: no error estimate
    assert study.mean_std([1, 2, 3, float("nan")]) == (2.0, 1.0)


def test_flattened_reads_the_last_fifth_of_a_curve():
    steps = list(range(1, 101))
    falling = [2.0 - s / 100 for s in steps]  # steps 61-80 mean 1.295, 81-100 mean 1.095: 15% better
    gain, ok = study.flattened(steps, falling, "loss")
    assert abs(gain - (1.295 - 1.095) / 1.295) < 1e-9 and not ok
    gain, ok = study.flattened(steps, [1.0] * 100, "loss")
    assert gain == 0 and ok
    gain, ok = study.flattened([10, 20, 30, 40, 50], [0.1, 0.3, 0.5, 0.52, 0.53], "dice")
    assert abs(gain - 0.01) < 1e-12 and ok  # 0.53 at the end against 0.52 at step 40
    assert not study.flattened([10, 20, 30, 40, 50], [0.1, 0.2, 0.3, 0.4, 0.6], "dice")[1]


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    rows = [{"method": "ours", "PSNR": 20.0}, {"method": "ours", "PSNR": 22.0}, {"method": "identity", "PSNR": 19.0}]
    got = study.aggregate(rows, ("method",), 2)
    assert got == [{"method": "ours", "PSNR": "21.00 ± 1.41", "seeds": 2}, {"method": "identity", "PSNR": "19.00", "seeds": 1}]


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return write_brats(root / "brats", n=10), write_autopet(root / "autopet", n=10)


def test_study_runs_on_a_tiny_budget_writes_its_section_and_reruns_nothing(tiny_sets, tmp_path):
    brats, autopet = tiny_sets
    readme, results = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    (begin, end), (cbegin, cend) = section_markers("study"), section_markers("study-claims")
    results.parent.mkdir()
    results.write_text(f"# x\n\n{begin}\nOLD SECTION\n{end}\n\ntail\n")
    readme.write_text(f"# r\n{cbegin}\nOLD CLAIMS\n{cend}\n")
    argv = ["--out", str(tmp_path / "study"), "--seeds", "0", "--data", str(brats), "--data-petct", str(autopet),
            "--pretrain-steps", "1", "--seg-steps", "1", "--val-every", "1", "--labelled", "2", "--seg-subsets",
            "given", "--transfer-steps", "1", "--petct-presets", "6", "--petct-seeds", "0",
            "--petct-pretrain-steps", "1", "--petct-seg-steps", "1", "--results", str(results), "--readme", str(readme), "--option"]
    res = study.main(argv)
    text = results.read_text()
    assert text.startswith("# x\n\n" + begin) and text.endswith(end + "\n\ntail\n") and "OLD SECTION" not in text
    for title in ("MRI segmentation", "MRI transfer", "PET/CT lesion", "person identification", "Budgets",
                  "Learning curves"):
        assert title in text, title
    assert (tmp_path / "docs" / study.figure_name("study")).stat().st_size > 0 and f"]({study.figure_name('study')})" in text
    claims_text = readme.read_text()
    assert "OLD CLAIMS" not in claims_text and "[docs/results.md](docs/results.md)" in claims_text
    assert all(c in claims_text for c in res["claims"])
    assert all(c.startswith(("- holds:", "- does not hold:", "- within noise:")) for c in res["claims"])
    # 2 segmentation, 4 transfer (with the option's), preset 6 vs scratch, raw identification, and the
    # mechanism of ours and of the option: personal, then against the baseline and the untrained network
    assert len(res["claims"]) == 18
    assert {r["network"] for r in res["per_seed"]["id"] if r["data"] == "MRI"} == {"untrained", "swinunetr", "ours",
                                                                                  "ours+6p"}
    assert all(0 <= r["between (X_h')"] <= 1 for r in res["per_seed"]["id"])
    seg = [r for r in res["per_seed"]["seg"] if r["labelled"] == "few"]
    assert sorted((r["seed"], r["init"]) for r in seg) == [(0, "ours"), (0, "scratch")]
    # the few-label runs tuned on 2 persons, the same two for ours and scratch
    for seed in (0,):
        runs = [json.loads((tmp_path / "study" / f"seed{seed}" / "mri" / f"seg-few-{i}" / "init.json").read_text())
                for i in ("ours", "scratch")]
        assert runs[0]["init"].startswith("ours:") and runs[1]["init"] == "scratch"
    logs = sorted((tmp_path / "study").rglob("log.jsonl")) + sorted((tmp_path / "study").rglob("last.pt"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    results = {p: p.stat().st_mtime_ns for p in (tmp_path / "study").rglob("results.json")}
    took = json.loads((tmp_path / "study" / "STUDY.json").read_text())["meta"]["minutes"]
    study.main(argv)  # a rerun continues where the first stopped: here, nothing is left to do
    # the time reported is that of every invocation's stages, not of the last one alone
    assert json.loads((tmp_path / "study" / "STUDY.json").read_text())["meta"]["minutes"] >= took > 0
    assert {p: p.stat().st_mtime_ns for p in logs} == before
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "study").rglob("results.json")} == results
    # --part mechanism on the same runs: pre-trainings and identifications alone, reused; no
    # downstream table, claim or figure, and its own sections
    (mb, me), (mcb, mce) = section_markers("mech"), section_markers("mech-claims")
    mech_results, mech_readme = tmp_path / "docs" / "mech.md", tmp_path / "MECH.md"
    mech_results.write_text(f"{mb}\n{me}\n")
    mech_readme.write_text(f"{mcb}\n{mce}\n")
    part = argv[:argv.index("--results")] + argv[argv.index("--readme") + 2:]  # without the study's sections
    mech = study.main(part + ["--part", "mechanism", "--section", "mech", "--results", str(mech_results),
                              "--readme", str(mech_readme)])
    assert {p: p.stat().st_mtime_ns for p in logs} == before
    assert not mech["per_seed"]["seg"] and not mech["per_seed"]["transfer"] and not mech["per_seed"]["petct"]
    # raw identification, then ours and the option: personal, against the baseline and the untrained
    assert len(mech["claims"]) == 11 and mech["claims"] == res["claims"][-11:]
    text = mech_results.read_text()
    assert "person identification" in text and "MRI segmentation" not in text and "Learning curves" not in text
    assert "--part mechanism" in text and not (tmp_path / "docs" / study.figure_name("mech")).exists()
    assert {r["run"] for r in mech["per_seed"]["flat"]} == {"MRI pretrain", "MRI pretrain-swinunetr", "MRI pretrain-6p"}


def test_jobs_run_the_pretrainings_side_by_side_as_one_process_would(tiny_sets, tmp_path):
    import torch

    import demo

    brats, _ = tiny_sets
    argv = ["--out", str(tmp_path / "study"), "--seeds", "0", "--data", str(brats), "--pretrain-steps", "2",
            "--part", "mechanism", "--petct-presets", "", "--jobs", "2"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # 2 jobs of 1 thread each, like the reference below
        study.main(argv)
        torch.set_num_threads(1)
        ref = demo.pretrain(str(brats), tmp_path / "ref", 2, "full", 0)
    finally:
        torch.set_num_threads(threads)
    mri = tmp_path / "study" / "seed0" / "mri"
    got = torch.load(mri / "pretrain" / "last.pt", weights_only=True)["model"]
    want = torch.load(ref, weights_only=True)["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # each worker's output in a file beside its run; the stage times recorded, less their overlap
    assert "pretrain" in (mri / "pretrain.log").read_text() and (mri / "pretrain-swinunetr.log").stat().st_size
    took = json.loads((tmp_path / "study" / "times.json").read_text())
    names = [n for n in took if "pre-training" in n]
    assert len(names) == 2 and all(took[n] > 1 for n in names) and took[study.OVERLAP] >= 0
    assert took[study.OVERLAP] < sum(took[n] for n in names)


ORPHAN = """
import functools, multiprocessing, os, pathlib, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
import study
log = pathlib.Path(sys.argv[1])
pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
pool.submit(study._job, functools.partial(time.sleep, 300), 1, log, os.getpid())
while not log.exists():
    time.sleep(0.1)
print(*pool._processes, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_jobs_worker_ends_when_the_study_is_killed(tmp_path):
    root = Path(study.__file__).parent
    # files, not pipes: a worker left running would hold a pipe open
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        run = subprocess.run([sys.executable, "-c", ORPHAN, str(tmp_path / "job.log")], cwd=root,
                             stdout=out, stderr=err, timeout=120)
    assert run.returncode == -9, (tmp_path / "err").read_text()  # died by SIGKILL, no cleanup ran
    worker = int((tmp_path / "out").read_text().split()[0])
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the worker of a killed study went on running"
