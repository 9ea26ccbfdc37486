"""train_pretrain.py on tiny synthetic BraTS-layout data (roi 32x32x64, F 12, two modalities)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model
import runtime as R
import train_pretrain

ROOT = Path(__file__).resolve().parents[1]


def args(data, out, steps, *extra):
    return ["--data", str(data), "--out", str(out), "--max-steps", str(steps), "--modalities", "t1,t2",
            "--roi", "32,32,64", "--phi", "rot90", "--feature-size", "12", "--prior-heads", "2", "--workers", "0",
            "--cache", str(Path(out).parent / "cache"), "--save-every", "3", *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_a_few_steps_lower_the_loss(tiny_brats, tmp_path):
    # one person, fixed crop centre: the same data every step, so the loss must go down
    train_pretrain.main(args(tiny_brats, tmp_path / "run", 4, "--lr", "1e-3", "--val-fraction", "0.4",
                             "--test-fraction", "0.4", "--id-every", "2"))
    log = read_log(tmp_path / "run")
    assert len(log) == 4
    assert log[-1]["decom"] < log[0]["decom"]
    assert log[-1]["loss"] < log[0]["loss"]
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000
    diagnostics = {k for k in train_pretrain.DIAGNOSTICS if not k.startswith("id_")}
    for row in log:
        assert {"loss", "contr", "equ", "inv", "decom", "lr", "data_wait_s"} | diagnostics <= set(row)
        assert 0 <= row["grad_share"] <= 1 and 0 <= row["prior_share"] and row["xh_rms"] > 0
        assert row["equ_acc"] in (0.0, 0.5, 1.0) and row["contr_acc"] in (0.0, 0.5, 1.0)  # two modalities
    # person identification on the 2 val persons at steps 2 and 4
    assert [r["step"] for r in log if "id_acc" in r] == [2, 4]
    assert all(r["id_chance"] == 0.5 and 0 <= r["id_acc"] <= 1 for r in log if "id_acc" in r)
    for r in (r for r in log if "id_acc" in r):  # the mechanism: fractions, and an entropy below its maximum
        assert {k for k in train_pretrain.DIAGNOSTICS if k.startswith("id_")} <= set(r)
        assert all(0 <= r[k] <= 1 + 1e-9 for k in ("id_acc_centred", "id_between", "id_between_z", "id_between_zp",
                                                   "id_attention_entropy"))
        assert 0 <= r["id_between_dims"] <= 1 + 1e-9  # 2 persons span one direction at most
        assert r["id_spread_via_zp"] >= 0


def test_stage1_reads_no_label(tiny_brats, tmp_path):
    """The same data with every label file removed: the same run, bitwise (crops come from the
    brain foreground, never from the labels)."""
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(tiny_brats, bare, ignore=shutil.ignore_patterns("*_seg.nii.gz"))
    assert not list(bare.rglob("*_seg.nii.gz")) and list(Path(tiny_brats).rglob("*_seg.nii.gz"))
    train_pretrain.main(args(tiny_brats, tmp_path / "labelled", 3))
    train_pretrain.main(args(bare, tmp_path / "unlabelled", 3))
    timing = {"data_wait_s", "step_s"}
    la = [{k: v for k, v in r.items() if k not in timing} for r in read_log(tmp_path / "labelled")]
    lb = [{k: v for k, v in r.items() if k not in timing} for r in read_log(tmp_path / "unlabelled")]
    assert len(la) == 3 and la == lb
    a, b = params(tmp_path / "labelled" / "last.pt"), params(tmp_path / "unlabelled" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_prior_moves(tiny_brats, tmp_path):
    """After 4 steps at the default learning rate (2e-4) the prior O has moved by at least 2e-3
    of its norm. Adam moves an entry by at most about lr_O per step, so 4 steps move a unit-
    scale O by at most ~4 lr_O = 8e-3 of its norm with O's own rate (10 x lr): the threshold is a
    quarter of that. With the previous optimiser (one learning rate, gradients clipped to norm 1,
    which pushes O's gradient below Adam's epsilon) O moves about 100 times less; the second run
    shows that this set-up fails the threshold."""
    train_pretrain.main(args(tiny_brats, tmp_path / "now", 4))
    train_pretrain.main(args(tiny_brats, tmp_path / "before", 4, "--clip", "1", "--prior-lr", "1"))
    now, before = read_log(tmp_path / "now")[-1]["prior_change"], read_log(tmp_path / "before")[-1]["prior_change"]
    assert now >= 2e-3 > before, (now, before)
    ck = torch.load(tmp_path / "now" / "last.pt", map_location="cpu", weights_only=True)
    change = (ck["model"]["prior"] - ck["prior_init"]).norm() / ck["prior_init"].norm()
    assert abs(float(change) - now) < 1e-6


def test_optimizer_gives_the_prior_its_rate_without_weight_decay():
    """Every trainable parameter in exactly one group: O at --prior-lr x --lr without weight
    decay, everything else (F_equ, g and the prior's attention included) at --lr."""
    net = model.PersonalizedSwinUNETR(2, 2, feature_size=12, roi=(32, 32, 64), prior_heads=2)
    params, optim = R.make_optimizer(net, train_pretrain.Config(lr=1e-3, weight_decay=1e-5, prior_lr=10.0))
    seen = [id(p) for g in optim.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in net.parameters()) == sorted(map(id, params))
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in optim.param_groups for p in g["params"]}
    assert rate.pop(id(net.prior)) == (1e-2, 0.0)
    assert set(rate.values()) == {(1e-3, 1e-5)}


@pytest.mark.parametrize("preset,terms,prior", [
    ("1", {"contr", "equ", "decom"}, False), ("2", {"contr", "inv", "decom"}, False),
    ("3", {"contr", "equ", "inv", "decom"}, False), ("4", {"contr", "equ", "decom"}, True),
    ("5", {"contr", "inv", "decom"}, True), ("6", {"contr", "equ", "inv", "decom"}, True),
    ("6p", {"contr", "equ", "inv", "pers", "decom"}, True), ("6v", {"contr", "equ", "inv", "var", "decom"}, True),
    ("6vc", {"contr", "equ", "inv", "var", "cov", "decom"}, True), ("swinunetr", {"decom"}, False)])
def test_presets_switch_their_terms(tiny_brats, tmp_path, preset, terms, prior):
    out = tmp_path / preset
    train_pretrain.main(args(tiny_brats, out, 1, "--preset", preset))
    row = read_log(out)[0]
    assert {k for k in train_pretrain.TERMS if k in row} == terms
    sd = params(out / "last.pt")
    assert ("prior" in sd) == prior
    assert any(k.startswith("fuse.") for k in sd) == prior
    assert any(k.startswith("equ_head.") for k in sd) == (preset != "swinunetr")


@pytest.mark.parametrize("same_views", [False, True])
def test_same_views_turn_and_crop_the_persons_of_a_step_alike(tiny_brats, tmp_path, monkeypatch, same_views):
    """--same-views (batch 2): the crops of a step at one relative position (the loader's sampler
    groups them, tests/test_sampling.py), one phi per modality for both persons, and L_var over
    this modality's X_h' of the batch; without it, turns of their own and L_var over anchors."""
    turns, pools, shared = [], [], []
    per_sample, person_variance, train_loader = (train_pretrain.per_sample, train_pretrain.losses.person_variance,
                                                 R.train_loader)

    def spy_turns(fn, x, ks, kind):
        if fn is train_pretrain.sampling.phi and x.shape[1] == 1:  # the view of modality i, not a negative
            turns.append(ks.tolist())
        return per_sample(fn, x, ks, kind)

    def spy_pool(xh, others, person, other_persons, *a):
        pools.append(others is not None and torch.equal(others, xh.detach()) and torch.equal(other_persons, person))
        return person_variance(xh, others, person, other_persons, *a)

    def spy_loader(*a, **kw):
        loader = train_loader(*a, **kw)
        shared.append(loader.sampler.shared)
        return loader

    monkeypatch.setattr(train_pretrain, "per_sample", spy_turns)
    monkeypatch.setattr(train_pretrain.losses, "person_variance", spy_pool)
    monkeypatch.setattr(R, "train_loader", spy_loader)
    flags = ["--same-views"] if same_views else []
    train_pretrain.main(args(tiny_brats, tmp_path / "run", 3, "--preset", "6v", "--batch-size", "2", "--id-every", "0",
                             *flags))
    assert shared == [same_views] and len(turns) == len(pools) == 6  # 3 steps x 2 modalities
    assert all(len(k) == 2 for k in turns)
    if same_views:
        assert all(k[0] == k[1] for k in turns) and all(pools)
        assert all(r["var"] > 0 for r in read_log(tmp_path / "run"))
    else:
        assert any(k[0] != k[1] for k in turns) and not any(pools)
    if same_views:
        with pytest.raises(SystemExit, match="--same-views: a global batch of 1 person"):
            train_pretrain.main(args(tiny_brats, tmp_path / "one", 1, "--preset", "6v", "--same-views"))
        with pytest.raises(SystemExit, match="L_cov compares the directions between 3 or more"):
            train_pretrain.main(args(tiny_brats, tmp_path / "two", 1, "--preset", "6vc", "--same-views",
                                     "--batch-size", "2"))


@pytest.mark.parametrize("same_views", [False, True])
def test_pers_with_same_views_compares_this_steps_persons_centred(tiny_brats, tmp_path, monkeypatch, same_views):
    """L_pers (preset 6p, batch 2): with --same-views its other persons are this step's global
    batch alone, anchors whose persons are the batch's; without, earlier steps' persons from the
    queue join them. --pers-centre reaches the loss."""
    seen, person_nce = [], train_pretrain.losses.person_nce

    def spy(xh, anchor, others, person, other_persons, tau, centre):
        if others is not None:
            seen.append((len(others), torch.equal(other_persons, person), centre))
        return person_nce(xh, anchor, others, person, other_persons, tau, centre)

    monkeypatch.setattr(train_pretrain.losses, "person_nce", spy)
    flags = ["--same-views"] if same_views else []
    train_pretrain.main(args(tiny_brats, tmp_path / "run", 3, "--preset", "6p", "--batch-size", "2", "--id-every", "0",
                             "--pers-centre", *flags))
    assert len(seen) == 3 and all(c for _, _, c in seen)  # the second modality of each step
    if same_views:
        assert all(n == 2 and same for n, same, _ in seen)
    else:
        assert [n for n, _, _ in seen] == [2, 4, 6]


def test_pers_on_the_priors_part_takes_that_part_against_this_steps_persons(tiny_brats, tmp_path, monkeypatch):
    """Preset 6pz (batch 2, --same-views): L_pers's query is X_h''s part through the prior branch,
    the tensor personalize_with_part returns beside X_h', its positive that part's own running anchor
    and its other persons this step's batch; no term on X_h' itself. Without --same-views: a
    one-line error and no run."""
    parts, seen, person_nce = [], [], train_pretrain.losses.person_nce
    with_part = model.PersonalizedSwinUNETR.personalize_with_part

    def spy_part(net, z):
        xh, part = with_part(net, z)
        parts.append(part)
        return xh, part

    def spy(xh, anchor, others, person, other_persons, tau, centre):
        if others is not None:
            # at the second of 2 modalities the anchor is the first's part
            seen.append((xh is parts[-1], len(others), torch.equal(other_persons, person), centre,
                         torch.equal(anchor, parts[-2].detach())))
        return person_nce(xh, anchor, others, person, other_persons, tau, centre)

    monkeypatch.setattr(model.PersonalizedSwinUNETR, "personalize_with_part", spy_part)
    monkeypatch.setattr(train_pretrain.losses, "person_nce", spy)
    with pytest.raises(SystemExit, match="add --same-views"):
        train_pretrain.main(args(tiny_brats, tmp_path / "no", 1, "--preset", "6pz", "--batch-size", "2"))
    assert not (tmp_path / "no" / "last.pt").exists()
    train_pretrain.main(args(tiny_brats, tmp_path / "run", 2, "--preset", "6pz", "--batch-size", "2", "--id-every",
                             "0", "--same-views", "--pers-centre"))
    assert seen == [(True, 2, True, True, True)] * 2
    rows = read_log(tmp_path / "run")
    assert {k for k in train_pretrain.TERMS if k in rows[0]} == {"contr", "equ", "inv", "pers_zp", "decom"}
    assert all(r["pers_zp"] > 0 for r in rows)


def test_resume_is_exact(tiny_brats, tmp_path):
    # Adam's epsilon raised: gradient elements that are zero up to CPU rounding noise would
    # otherwise be blown up to +-lr and hide what the test is about. Preset 6p: every term, and
    # L_pers's queue of earlier persons, which the checkpoint must carry.
    eps = ("--adam-eps", "1e-6", "--preset", "6p")
    train_pretrain.main(args(tiny_brats, tmp_path / "once", 6, *eps))
    train_pretrain.main(args(tiny_brats, tmp_path / "twice", 3, *eps))
    train_pretrain.main(args(tiny_brats, tmp_path / "twice", 6, "--resume", "auto", *eps))
    a, b = params(tmp_path / "once" / "last.pt"), params(tmp_path / "twice" / "last.pt")
    worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
    assert worst[0] <= 1e-6, worst
    la, lb = read_log(tmp_path / "once"), read_log(tmp_path / "twice")
    assert [r["step"] for r in lb] == list(range(1, 7))
    assert abs(la[-1]["loss"] - lb[-1]["loss"]) < 1e-5
    assert abs(la[-1]["pers"] - lb[-1]["pers"]) < 1e-5 and max(r["pers"] for r in la) > 0  # other persons met
    queue = torch.load(tmp_path / "twice" / "last.pt", map_location="cpu", weights_only=True)["pers_queue"]
    assert len(queue) == 2 and queue[0].shape[0] == queue[1].shape[0] == 6  # one person a step, 6 steps


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tiny_brats, tmp_path):
    """2 ranks x 1 person == 1 process x 2 persons (the global batch is the same). Adam's
    epsilon is raised above the gradient scale so the update is proportional to the gradient:
    rounding differences between a batch of 2 and two batches of 1 stay at rounding level
    instead of being normalised up to +-lr, while a wrong gradient average would not; clipping
    at 1 keeps every gradient element below that epsilon."""
    eps = ("--adam-eps", "1e-3", "--clip", "1")
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


def test_identify_command(tiny_brats, tmp_path):
    """evaluate.py --task identify on a stage-1 checkpoint: the numbers of
    metrics.person_identification on features recomputed here, the table, the PCA figure;
    --untrained rebuilds the run's initial weights."""
    import data
    import layouts
    import evaluate
    import inference
    import metrics

    out = tmp_path / "run"
    train_pretrain.main(args(tiny_brats, out, 2, "--id-every", "0"))
    res = evaluate.main(["--ckpt", str(out / "last.pt"), "--data", str(tiny_brats), "--task", "identify",
                         "--split", "all", "--out", str(tmp_path / "id"), "--figures", "1",
                         "--cache", str(tmp_path / "cache")])
    saved = json.loads((tmp_path / "id" / "results.json").read_text())
    assert set(saved["meta"]["cases"]) == {f"Case_{i:03d}" for i in range(5)}
    net, meta = inference.load_pretrained(out / "last.pt")
    spec = layouts.resolve(str(tiny_brats), ["t1", "t2"]).without_labels()
    with torch.no_grad():
        feats = torch.stack([torch.stack(inference.person_features(
            net, data.load_case(spec.case(c), spec, tmp_path / "cache").image, ["t1", "t2"], tuple(meta["roi"])))
            for c in saved["meta"]["cases"]])
    want = metrics.person_identification(feats, ["T1", "T2"])
    for k in ("accuracy", "chance", "cos_same", "cos_other"):
        assert abs(saved["summary"][k] - want[k]) < 1e-9 and abs(res["summary"][k] - want[k]) < 1e-9, k
    assert saved["summary"]["chance"] == 0.2 and set(saved["summary"]["pairs"]) == {"T1>T2", "T2>T1"}
    table = (tmp_path / "id" / "table_identification.md").read_text()
    assert "| T1 |" in table and "| all |" in table
    # the mechanism of z, z' and X_h': the decomposition of the same features, raw and centred identification
    mech = saved["summary"]["mechanism"]
    assert set(mech) == {"z", "z'", "X_h'", "X_h' via z", "X_h' via z'"}
    assert 0 < saved["summary"]["attention_entropy_ratio"] <= 1
    assert abs(mech["X_h'"]["between"] - metrics.variance_decomposition(feats)["between"]) < 1e-9
    assert mech["X_h'"]["accuracy"] == saved["summary"]["accuracy"]
    assert abs(mech["X_h'"]["accuracy_centred"] - metrics.person_identification(feats, centre=True)["accuracy"]) < 1e-9
    assert "| z' |" in (tmp_path / "id" / "table_mechanism.md").read_text()
    assert (tmp_path / "id" / "figures" / "embedding.png").stat().st_size > 1000
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    fresh, _ = inference.load_pretrained(out / "last.pt", untrained=True)
    assert torch.equal(fresh.prior.detach(), ck["prior_init"]) and not torch.equal(fresh.prior.detach(), net.prior)
    # --split train: the persons pre-training saw, as the checkpoint records them
    evaluate.main(["--ckpt", str(out / "last.pt"), "--data", str(tiny_brats), "--task", "identify", "--split", "train",
                   "--out", str(tmp_path / "id-train"), "--figures", "0", "--cache", str(tmp_path / "cache")])
    saved = json.loads((tmp_path / "id-train" / "results.json").read_text())
    assert saved["meta"]["cases"] == list(ck["split"]["train"]) and len(saved["meta"]["cases"]) >= 2


@pytest.mark.parametrize("decom_skips", ["all", "none"])
def test_decom_skips_none_gives_the_decoder_x_h_alone(tiny_brats, tmp_path, monkeypatch, decom_skips):
    """--decom-skips none: L_decom's decoder gets X_h' and zeros in place of the skips and the
    input; all (the default) gets the encoder's skips and the input as they are."""
    seen = []
    decode = model.PersonalizedSwinUNETR.decode

    def spy(self, z, skips, x):
        seen.append((z.detach().abs().amax().item(), [s.detach().abs().amax().item() for s in skips],
                     x.detach().abs().amax().item()))
        return decode(self, z, skips, x)

    monkeypatch.setattr(model.PersonalizedSwinUNETR, "decode", spy)
    train_pretrain.main(args(tiny_brats, tmp_path / "run", 1, "--decom-skips", decom_skips, "--id-every", "0"))
    assert len(seen) == 2  # one decode per modality
    for xh, skips, x in seen:
        assert xh > 0
        if decom_skips == "none":
            assert skips == [0.0] * 4 and x == 0.0
        else:
            assert min(skips) > 0 and x > 0
    assert read_log(tmp_path / "run")[0]["decom"] > 0
