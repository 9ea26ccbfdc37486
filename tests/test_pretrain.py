"""train_pretrain.py on tiny synthetic BraTS-layout data (roi 32x32x64, F 12, two modalities)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_pretrain

ROOT = Path(__file__).resolve().parents[1]


def args(data, out, steps, *extra):
    return ["--data", str(data), "--out", str(out), "--max-steps", str(steps), "--modalities", "t1,t2",
            "--roi", "32,32,64", "--feature-size", "12", "--prior-heads", "2", "--workers", "0",
            "--cache", str(Path(out).parent / "cache"), "--save-every", "3", *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_a_few_steps_lower_the_loss(tiny_brats, tmp_path):
    # one person, fixed crop centre: the same data every step, so the loss must go down
    train_pretrain.main(args(tiny_brats, tmp_path / "run", 4, "--lr", "1e-3", "--val-fraction", "0.4",
                             "--test-fraction", "0.4", "--fg-fraction", "1.0"))
    log = read_log(tmp_path / "run")
    assert len(log) == 4
    assert log[-1]["decom"] < log[0]["decom"]
    assert log[-1]["loss"] < log[0]["loss"]
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000
    for row in log:
        assert {"loss", "contr", "equ", "inv", "decom", "lr", "data_wait_s"} <= set(row)


@pytest.mark.parametrize("preset,terms,prior", [
    ("1", {"contr", "equ", "decom"}, False), ("2", {"contr", "inv", "decom"}, False),
    ("3", {"contr", "equ", "inv", "decom"}, False), ("4", {"contr", "equ", "decom"}, True),
    ("5", {"contr", "inv", "decom"}, True), ("6", {"contr", "equ", "inv", "decom"}, True),
    ("swinunetr", {"decom"}, False)])
def test_presets_switch_their_terms(tiny_brats, tmp_path, preset, terms, prior):
    out = tmp_path / preset
    train_pretrain.main(args(tiny_brats, out, 1, "--preset", preset))
    row = read_log(out)[0]
    assert {k for k in ("contr", "equ", "inv", "decom") if k in row} == terms
    sd = params(out / "last.pt")
    assert ("prior" in sd) == prior
    assert any(k.startswith("fuse.") for k in sd) == prior
    assert any(k.startswith("equ_head.") for k in sd) == (preset != "swinunetr")


def test_resume_is_exact(tiny_brats, tmp_path):
    # Adam's epsilon raised: gradient elements that are zero up to CPU rounding noise would
    # otherwise be blown up to +-lr and hide what the test is about.
    eps = ("--adam-eps", "1e-6")
    train_pretrain.main(args(tiny_brats, tmp_path / "once", 6, *eps))
    train_pretrain.main(args(tiny_brats, tmp_path / "twice", 3, *eps))
    train_pretrain.main(args(tiny_brats, tmp_path / "twice", 6, "--resume", "auto", *eps))
    a, b = params(tmp_path / "once" / "last.pt"), params(tmp_path / "twice" / "last.pt")
    worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
    assert worst[0] <= 1e-6, worst
    la, lb = read_log(tmp_path / "once"), read_log(tmp_path / "twice")
    assert [r["step"] for r in lb] == list(range(1, 7))
    assert abs(la[-1]["loss"] - lb[-1]["loss"]) < 1e-5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tiny_brats, tmp_path):
    """2 ranks x 1 person == 1 process x 2 persons (the global batch is the same). Adam's
    epsilon is raised above the gradient scale so the update is proportional to the gradient:
    rounding differences between a batch of 2 and two batches of 1 stay at rounding level
    instead of being normalised up to +-lr, while a wrong gradient average would not."""
    eps = ("--adam-eps", "1e-3")
    train_pretrain.main(args(tiny_brats, tmp_path / "one", 2, "--batch-size", "2", *eps))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "train_pretrain.py"), *args(tiny_brats, tmp_path / "two", 2, "--batch-size", "1", *eps)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = params(tmp_path / "one" / "last.pt"), params(tmp_path / "two" / "last.pt")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 2e-6
    la, lb = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for key in ("loss", "contr", "equ", "inv", "decom"):  # the log shows the global batch
        assert abs(la[0][key] - lb[0][key]) < 1e-4 * max(1.0, abs(la[0][key])), key
