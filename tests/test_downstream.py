"""Stage-2 tuning on tiny synthetic BraTS cases: loss goes down, stage-1 / SSL weights load by
name, exact resume, the fused path for every modality subset, 2-rank validation = 1 process,
and a modality-order mismatch stops the run."""
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import layouts
import inference
import metrics
import model as M
import runtime as R
import sampling
import train_downstream as T
import train_pretrain

ROOT = Path(__file__).resolve().parent.parent
ROI = (32, 32, 64)  # smallest crop the rot90 (axial) pre-training accepts (D = H) with > 1 voxel at roi/32
TINY = ["--feature-size", "12", "--roi", ",".join(map(str, ROI)), "--prior-heads", "2", "--workers", "0"]
QUIET = lambda s: None  # noqa: E731


@pytest.fixture(scope="session")
def stage1(tiny_brats, tmp_path_factory):
    """One stage-1 checkpoint (t1, t2; one step) and a shared preprocessing cache."""
    out, cache = tmp_path_factory.mktemp("stage1"), tmp_path_factory.mktemp("cache")
    train_pretrain.main(["--data", str(tiny_brats), "--out", str(out), "--modalities", "t1,t2", "--max-steps", "1",
                         "--cache", str(cache), "--phi", "rot90", *TINY])
    return out / "last.pt", cache


def tune(tiny_brats, stage1, out, steps, *extra):
    # Adam's epsilon raised: gradient elements that are zero up to CPU rounding noise (the
    # relative-position-bias gradients are summed in a thread-dependent order) would otherwise
    # be blown up to +-lr on the first step and decide the comparisons.
    ck, cache = stage1
    return T.main(["--data", str(tiny_brats), "--out", str(out), "--init", f"ours:{ck}", "--max-steps", str(steps),
                   "--lr", "1e-3", "--adam-eps", "1e-6", "--val-every", "0", "--cache", str(cache), *TINY, *extra])


def trained_batch(tiny_brats, out, cache, steps):
    """The crops the first `steps` steps of a run trained on (batch 1, workers 0), as one batch;
    the crops are the whole padded volumes, so they are the same at every visit."""
    spec = layouts.resolve(tiny_brats, ["t1", "t2"])
    ids = json.loads((out / "split.json").read_text())["train"]
    ds = R.EpochIndexed(sampling.CropDataset([spec.case(i) for i in ids], ROI, spec=spec, cache_dir=cache))
    keys = list(R.StepSampler(len(ids), 1, steps, seed=0))
    batch = sampling.collate([ds[k] for k in keys])
    batch["image"] = sampling.dequantise(batch["image"], batch["scale"])
    return batch


@torch.no_grad()
def objective(net, batch, task, inputs, targets):
    """Algorithm-2 objective of a network (or checkpoint) on a batch, fixed order, full subsets."""
    net = inference.load_tuned(net)[0] if isinstance(net, Path) else net.eval()
    n = len(inputs)
    return T.tuning_step(net, batch["image"], batch, T.Config(task=task), inputs, targets, np.arange(n),
                         torch.ones(n, batch["image"].shape[0]), R.Dist(), backward=False)["loss"]


def train_entries(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("data_wait_s", "step_s")} for r in rows if "loss" in r]


def test_seg_from_stage1_loads_every_tensor_but_the_head_and_lowers_loss(tiny_brats, stage1, tmp_path):
    ck = torch.load(stage1[0], weights_only=True)
    out = tmp_path / "seg"
    r0 = tune(tiny_brats, stage1, out, 0)
    head = {"out.conv.conv.weight", "out.conv.conv.bias"}
    assert set(r0["init"]["skipped"]) == head
    assert sorted(r0["init"]["loaded"]) == sorted(set(ck["model"]) - head)
    assert sorted(r0["init"]["missing"]) == sorted(head)
    assert json.loads((out / "init.json").read_text())["skipped"] == r0["init"]["skipped"]
    shutil.copy(out / "last.pt", tmp_path / "step0.pt")
    sd0 = torch.load(tmp_path / "step0.pt", weights_only=True)["model"]
    assert all(torch.equal(sd0[k], ck["model"][k]) for k in r0["init"]["loaded"])
    assert sd0["out.conv.conv.weight"].shape[0] == 3  # TC, WT, ET

    r = tune(tiny_brats, stage1, out, 2, "--resume", "auto")
    assert r["step"] == 2 and set(r["val"]) == {"dice_tc", "dice_wt", "dice_et", "dice"}
    batch = trained_batch(tiny_brats, out, stage1[1], 2)
    assert objective(out / "last.pt", batch, "seg", [0, 1], []) < objective(tmp_path / "step0.pt", batch, "seg",
                                                                             [0, 1], [])
    net, meta = inference.load_tuned(out / "best.pt")
    assert meta["task"] == "seg" and meta["regions"] == ["tc", "wt", "et"] and meta["modalities"] == ["t1", "t2"]
    assert meta["inputs"] == ["t1", "t2"] and meta["roi"] == list(ROI)


def test_transfer_keeps_target_head_rows_lowers_loss_and_resumes_exactly(tiny_brats, stage1, tmp_path):
    ck = torch.load(stage1[0], weights_only=True)
    a, b = tmp_path / "a", tmp_path / "b"
    task = ("--task", "transfer", "--inputs", "t1", "--targets", "t2")
    r1 = tune(tiny_brats, stage1, a, 1, *task)
    assert r1["init"]["skipped"] == [] and sorted(r1["init"]["loaded"]) == sorted(ck["model"])
    ra = tune(tiny_brats, stage1, a, 2, *task, "--resume", "auto")
    rb = tune(tiny_brats, stage1, b, 2, *task)
    sa, sb = torch.load(a / "last.pt", weights_only=True), torch.load(b / "last.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 2
    for k in sb["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=0, atol=1e-6, msg=k)
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        for k in pb:  # step counts exactly, moments up to rounding noise
            torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5 * pb[k].abs().max().item() + 1e-12)
    la, lb = train_entries(a / "log.jsonl"), train_entries(b / "log.jsonl")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2]
    for ea, eb in zip(la, lb):
        assert ea.keys() == eb.keys() and all(ea[k] == pytest.approx(eb[k], rel=1e-5, abs=1e-7) for k in ea)
    assert all(ra["val"][k] == pytest.approx(rb["val"][k], rel=1e-5) for k in rb["val"])
    assert np.isfinite(ra["val"]["psnr"]) and np.isfinite(ra["val"]["psnr_identity"])

    val = json.loads((a / "val.json").read_text())
    assert list(val["cases"]) == json.loads((a / "split.json").read_text())["val"]
    case = next(iter(val["cases"].values()))
    assert set(case["pairs"]) == {"t1>t2"} and case["psnr"] == case["pairs"]["t1>t2"]["psnr"]

    # the initial network: stage-1 weights; the stage-1 decoder already predicts t2 (channel 1), so
    # its row of the output layer is kept
    net0 = M.build_model(sa["arch"])
    T.load_stage1(net0, ck, "transfer", ["t2"], log=QUIET)
    assert torch.equal(net0.out.conv.conv.weight, ck["model"]["out.conv.conv.weight"][1:2])
    assert torch.equal(net0.out.conv.conv.bias, ck["model"]["out.conv.conv.bias"][1:2])
    batch = trained_batch(tiny_brats, a, stage1[1], 2)
    assert objective(a / "last.pt", batch, "transfer", [0], [1]) < objective(net0, batch, "transfer", [0], [1])


def test_stage1_into_plain_swinunetr_and_new_decoder(stage1):
    ck = torch.load(stage1[0], weights_only=True)
    arch = dict(ck["arch"], kind="swinunetr", out_channels=3)
    plain = M.build_model(arch)
    rep = T.load_stage1(plain, ck, "seg", [], log=QUIET)
    bottleneck = [k for k in ck["model"] if k.startswith(("prior", "prior_attn.", "transfer.", "fuse.",
                                                          "equ_head.", "proj_head.", "out."))]
    assert {k.split(".")[0] for k in bottleneck} == {"prior", "prior_attn", "transfer", "fuse", "equ_head",
                                                     "proj_head", "out"}
    assert sorted(rep["skipped"]) == sorted(bottleneck)
    assert sorted(rep["loaded"]) == sorted(set(ck["model"]) - set(bottleneck))
    sd = plain.state_dict()
    assert all(torch.equal(sd[k], ck["model"][k]) for k in rep["loaded"])

    # F.4: keep E, O, Attn, T, Fuse; draw the whole decoder D anew
    net = M.build_model(dict(ck["arch"], out_channels=2))
    torch.manual_seed(1)
    rep = T.load_stage1(net, ck, "transfer", ["t1", "t2"], new_decoder=True, log=QUIET)
    decoder = [k for k in ck["model"] if k.split(".")[0] in
               ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4", "decoder3",
                "decoder2", "decoder1", "out")]
    # encoder1 3 convs (2 -> 12 channels), encoder2-4 and 10 two each, decoder5-1 four each, out 2
    assert len(decoder) == 3 + 4 * 2 + 5 * 4 + 2 and sorted(rep["skipped"]) == sorted(decoder)
    sd = net.state_dict()
    assert all(torch.equal(sd[k], ck["model"][k]) for k in rep["loaded"])
    assert not any(torch.equal(sd[k], ck["model"][k]) for k in decoder if sd[k].numel() > 1)
    assert any(k.startswith("prior_attn.") for k in rep["loaded"])
    assert "swinViT.patch_embed.proj.weight" in rep["loaded"]


def fake_ssl_checkpoint(path, fs=12):
    """Tang et al. model_swinvit.pt key names: module.* with mlp.fc1/fc2, 1 input channel, plus heads."""
    src = M.SwinUNETR(1, 1, feature_size=fs).swinViT.state_dict()
    sd = {"module." + k.replace("mlp.linear1.", "mlp.fc1.").replace("mlp.linear2.", "mlp.fc2."):
          torch.randn_like(v) if v.is_floating_point() else v for k, v in src.items()}
    sd.update({"module.rotation_head.weight": torch.randn(4, 16 * fs), "module.contrastive_head.weight":
               torch.randn(512, 16 * fs), "module.conv.0.weight": torch.randn(8, 16 * fs, 3, 3, 3)})
    torch.save({"epoch": 10, "state_dict": sd}, path)
    return sd


def test_init_ssl_loads_encoder_by_real_key_names(tiny_brats, stage1, tmp_path):
    sd = fake_ssl_checkpoint(tmp_path / "model_swinvit.pt")
    r = T.main(["--data", str(tiny_brats), "--modalities", "t1,t2", "--out", str(tmp_path / "ssl"), "--arch",
                "swinunetr", "--init", f"ssl:{tmp_path / 'model_swinvit.pt'}", "--max-steps", "0",
                "--cache", str(stage1[1]), *TINY])
    tuned = torch.load(tmp_path / "ssl" / "last.pt", weights_only=True)["model"]
    encoder = sorted(k for k in tuned if k.startswith("swinViT.") and tuned[k].is_floating_point())
    assert sorted(k for k in r["init"]["loaded"] if tuned[k].is_floating_point()) == encoder
    for key, v in sd.items():  # brute force: every encoder tensor of the file, by its own name
        if ".rotation_head." in key or ".contrastive_head." in key or ".conv.0." in key:
            continue
        ours = "swinViT." + key[len("module."):].replace(".fc1.", ".linear1.").replace(".fc2.", ".linear2.")
        want = v.repeat(1, 2, 1, 1, 1) / 2 if key.endswith("patch_embed.proj.weight") else v
        assert torch.equal(tuned[ours], want), ours
    assert not any(k.startswith("swinViT.") for k in r["init"]["missing"])


def all_subsets(n):
    return [list(s) for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]


@torch.no_grad()
def test_fused_inference_every_subset_of_4_and_of_2():
    torch.manual_seed(0)
    net = M.PersonalizedSwinUNETR(4, 3, feature_size=12, roi=ROI, prior_heads=2).eval()
    x = torch.randn(1, 4, *ROI)
    subsets = all_subsets(4)
    assert len(subsets) == 15
    encoded, decoded, encode, decode = [], [], net.encode, net.decode
    net.encode = lambda u: encoded.append((u, encode(u))) or encoded[-1][1]
    net.decode = lambda xh, skips, u: decoded.append((xh, skips, u)) or decode(xh, skips, u)
    outs = inference.fused_outputs(net, x, subsets)
    del net.encode, net.decode
    assert len(decoded) == len(outs) == 15
    # each modality encoded once, alone, repeated on the 4 channels
    assert len(encoded) == 4 and all(torch.equal(u, x[:, [i] * 4]) for i, (u, _) in enumerate(encoded))
    feats = [(net.personalize(z), skips, u) for u, (z, skips) in encoded]
    # brute force: what the decoder gets is the mean over the subset, summed by hand
    for s, (xh, skips, u) in zip(subsets, decoded):
        torch.testing.assert_close(xh, sum(feats[i][0] for i in s) / len(s), rtol=1e-5, atol=1e-6)
        for k in range(4):
            torch.testing.assert_close(skips[k], sum(feats[i][1][k] for i in s) / len(s), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(u, sum(feats[i][2] for i in s) / len(s), rtol=1e-5, atol=1e-6)
    skips = [sum(f[1][k] for f in feats) / 4 for k in range(4)]
    torch.testing.assert_close(outs[-1], decode(sum(f[0] for f in feats) / 4, skips, x.mean(1, keepdim=True).repeat(
        1, 4, 1, 1, 1)), rtol=1e-4, atol=1e-5)  # all four
    torch.testing.assert_close(outs[2], net(x[:, [2] * 4]), rtol=1e-4, atol=1e-5)  # one modality: plain forward
    assert not torch.allclose(outs[-1], outs[0])

    # two modalities (CT / PET): whole-volume prediction of a volume smaller than the roi, CT padded with air
    net2 = M.PersonalizedSwinUNETR(2, 1, feature_size=12, roi=ROI, prior_heads=2).eval()
    meta = {"modalities": ["ct", "pet"], "roi": list(ROI)}
    image = torch.rand(2, 20, 30, 50) * 2 - 1
    subsets = all_subsets(2)
    preds = inference.predict_subsets(net2, image, [[meta["modalities"][i] for i in s] for s in subsets], meta)
    padded = torch.full((1, 2, *ROI), -1.0)
    padded[:, 1] = 0.0
    padded[0, :, 6:26, 1:31, 7:57] = image
    feats = [(*inference.encode(net2, padded[:, [i] * 2]), padded[:, [i] * 2]) for i in range(2)]
    for s, p in zip(subsets, preds):
        assert p.shape == (1, 20, 30, 50)
        ref = net2.decode(*inference.fuse([feats[i] for i in s], torch.ones(len(s), 1)))
        torch.testing.assert_close(p, ref[0, :, 6:26, 1:31, 7:57], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="non-empty set"):
        inference.predict(net2, image, [], meta)


def test_init_monai_reference_ssl_on_the_command_line(tiny_brats, stage1, tmp_path):
    """Each foreign checkpoint, with the real key names, through --init: every tensor of the file
    that fits the network is in the tuned weights under our name, the new task's output layer is
    reported skipped, and ssl builds the legacy merging order that evaluation rebuilds."""
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
    from test_model import fake_reference_checkpoint

    monai_sd = {"module." + k: torch.randn_like(v) if v.is_floating_point() else v
                for k, v in MonaiSwinUNETR(in_channels=2, out_channels=2, feature_size=12).state_dict().items()}
    torch.save({"state_dict": monai_sd}, tmp_path / "monai.pt")
    ref_sd = fake_reference_checkpoint(12, 2, grid=tuple(r // 32 for r in ROI))
    torch.save({"state_dict": ref_sd}, tmp_path / "reference.pt")
    fake_ssl_checkpoint(tmp_path / "ssl.pt")
    want = {"monai": {k[len("module."):]: v for k, v in monai_sd.items()},
            "reference": {"prior": ref_sd["static_prior"][0], "prior_attn.in_proj_weight": ref_sd["attn_for_x.in_proj_weight"],
                          "transfer.0.weight": ref_sd["tansfer_for_mod.0.weight"],
                          **{"swinViT." + k[len("swinViT1."):]: v for k, v in ref_sd.items() if k.startswith("swinViT1.")}}}
    for kind in ("monai", "reference", "ssl"):
        out = tmp_path / f"run-{kind}"
        r = T.main(["--data", str(tiny_brats), "--modalities", "t1,t2", "--out", str(out), "--init",
                    f"{kind}:{tmp_path / (kind + '.pt')}", "--max-steps", "0", "--val-every", "-1",
                    "--cache", str(stage1[1]), *TINY])
        init = json.loads((out / "init.json").read_text())
        tuned = torch.load(out / "last.pt", weights_only=True)
        own = tuned["model"]
        assert init["init"].startswith(kind) and set(init["loaded"]) | set(init["missing"]) == set(own)
        assert not set(init["loaded"]) & set(init["missing"]) and r["init"]["loaded"] == init["loaded"]
        assert "out.conv.conv.weight" in init["missing"] and not any(k.startswith("swinViT.") for k in init["missing"])
        for k, v in want.get(kind, {}).items():
            if k.startswith("out."):
                assert k in init["skipped"]  # 2 modality rows vs 3 region channels
                continue
            assert k in init["loaded"] and torch.equal(own[k], v), k
        merging = "legacy" if kind == "ssl" else "monai"
        assert tuned["arch"]["merging"] == merging
        net, _ = inference.load_tuned(out / "last.pt")
        assert net.swinViT.layers1[0].downsample.offsets == M.MERGING_ORDERS[merging]
    assert len(json.loads((tmp_path / "run-monai" / "init.json").read_text())["loaded"]) == len(monai_sd) - 2
    with pytest.raises(SystemExit, match="reference:.*missing.pt"):
        T.main(["--data", str(tiny_brats), "--modalities", "t1,t2", "--out", str(tmp_path / "bad"), "--init",
                f"reference:{tmp_path / 'missing.pt'}", "--max-steps", "0", "--cache", str(stage1[1]), *TINY])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_validation_two_gloo_ranks_equals_one_process(tiny_brats, stage1, tmp_path):
    out = tmp_path / "ddp"
    ids = sorted(c.id for c in layouts.resolve(tiny_brats).cases)
    assert len(ids) == 5
    out.mkdir()
    (out / "split.json").write_text(json.dumps({"train": ids, "val": ids, "test": []}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "train_downstream.py"), "--data", str(tiny_brats), "--out", str(out), "--init",
           f"ours:{stage1[0]}", "--inputs", "t1", "--max-steps", "0", "--device", "cpu", "--cache", str(stage1[1]),
           *TINY]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((out / "val.json").read_text())
    assert list(two["cases"]) == ids

    net, meta = inference.load_tuned(out / "last.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = layouts.resolve(tiny_brats, ["t1", "t2"])
        cases, summary = T.validate(net, spec, ids, meta, R.Dist(), cache_dir=stage1[1])
    finally:
        torch.set_num_threads(threads)
    assert cases == two["cases"] and summary == two["summary"]
    # by hand: the mean over the 5 cases of each region's Dice (BraTS policy)
    for k in ("dice_tc", "dice_wt", "dice_et", "dice"):
        assert summary[k] == pytest.approx(sum(c[k] for c in cases.values()) / 5, abs=1e-12)
    assert summary["dice_wt"] > 0 or all(c["dice_wt"] == 0 for c in cases.values())


def test_modality_order_mismatch_stops_with_clear_message(tiny_brats, stage1, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit, match=r"modalities: checkpoint \['t1', 't2'\] != data \['t2', 't1'\].*"
                                         r"--modalities t1,t2"):
        tune(tiny_brats, stage1, out, 1, "--modalities", "t2,t1")
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(SystemExit, match="--roi 64,64,64: the stage-1 checkpoint was built with 32,32,64"):
        T.main(["--data", str(tiny_brats), "--out", str(out), "--init", f"ours:{stage1[0]}", "--roi", "64",
                "--max-steps", "1"])
    assert not out.exists() or not any(out.iterdir())


def test_validation_ranks_checkpoints_by_the_label_map_the_test_reports(monkeypatch):
    """Two predictions that the region channels and the label map rank differently: A marks ET
    outside the tumour (channels: WT 1, TC 1, ET 0.67; the label map paints it 4, which counts
    for WT and TC too), B leaves TC empty under an ET that the label map counts for TC
    (channels: 1, 0, 1; label map: 1, 1, 1). Validation must prefer B, as the test's numbers do."""
    shape = (10, 10, 10)
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:6, 2:6] = 2
    label[3:5, 3:5, 3:5] = 4
    values = dict(metrics.LABELS["brats"][1])  # tc, wt, et
    wt, et = label > 0, label == 4
    extra = np.zeros(shape, bool)
    extra[7:9, 7:9, 7:9] = True
    preds = {"A": (et, wt, et | extra), "B": (np.zeros(shape, bool), wt, et)}
    vol = data.Volume("c", np.zeros((1, *shape), np.float32), np.ones(shape, bool), label, {}, values)
    meta = {"task": "seg", "modalities": ["t1"], "inputs": ["t1"], "regions": list(values), "label_kind": "brats"}
    scores = {}
    for name, (tc, w, e) in preds.items():
        logits = torch.from_numpy(np.stack([tc, w, e]).astype(np.float32) * 10 - 5)
        monkeypatch.setattr(T, "predict", lambda *a, logits=logits, **k: logits)
        scores[name] = T.score_case(torch.nn.Linear(1, 1), vol, meta, 0.5, 1, False)
        lab = data.regions_to_label(logits.numpy() > 0, values)
        reported = metrics.brats_seg_metrics(metrics.brats_regions(lab), metrics.brats_regions(label))
        assert scores[name]["dice"] == pytest.approx(np.mean([reported[r] for r in ("WT", "TC", "ET")]))
    assert scores["A"]["dice"] == pytest.approx((128 / 136 + 16 / 24 + 16 / 24) / 3)
    assert scores["B"]["dice"] == pytest.approx(1.0)
    assert scores["B"]["dice"] > scores["A"]["dice"]


def test_labelled_tunes_on_the_same_few_persons_whatever_the_init(tiny_brats, stage1, tmp_path, monkeypatch):
    """--labelled N: the loader gets N of the split's training persons, the same ones for ours
    and scratch with one seed (a paired low-label comparison), recorded in the checkpoint; 0
    gives all of them, more than there are stops with a one-line error."""
    seen = []
    loader = R.train_loader
    monkeypatch.setattr(R, "train_loader", lambda spec, ids, *a, **k: seen.append(list(ids)) or loader(spec, ids, *a, **k))
    tune(tiny_brats, stage1, tmp_path / "ours", 1, "--task", "seg", "--labelled", "2")
    T.main(["--data", str(tiny_brats), "--out", str(tmp_path / "scratch"), "--init", "scratch", "--modalities", "t1,t2",
            "--task", "seg", "--max-steps", "1", "--val-every", "-1", "--labelled", "2", "--cache", str(stage1[1]), *TINY])
    tune(tiny_brats, stage1, tmp_path / "all", 1, "--task", "seg")
    train = json.loads((tmp_path / "ours" / "split.json").read_text())["train"]
    assert json.loads((tmp_path / "scratch" / "split.json").read_text())["train"] == train
    assert seen[0] == seen[1] and len(seen[0]) == 2 and set(seen[0]) < set(train)
    assert seen[2] == train
    ck = torch.load(tmp_path / "ours" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["task"]["persons"] == seen[0] and ck["config"]["labelled"] == 2
    with pytest.raises(SystemExit, match=f"--labelled 99: choose 0 \\(all\\) to {len(train)}"):
        tune(tiny_brats, stage1, tmp_path / "many", 1, "--task", "seg", "--labelled", "99")
