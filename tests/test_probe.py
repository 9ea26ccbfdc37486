"""probe.py: the supervised contrastive loss against a written-out loop, the fit on synthetic
features whose persons a fitted map can or cannot recover, and the command on a stage-1
checkpoint (encoder weights carried to another roi, the unfitted z row against the metrics)."""
import json
import math

import pytest
import torch
from torch import nn

import metrics
import probe
from conftest import write_brats


def test_person_contrast_matches_a_written_out_loop():
    torch.manual_seed(0)
    feats = torch.randn(7, 2, 3)
    person = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # persons 2 and 3 have no positive
    tau = 0.2
    f = feats.flatten(1).double()
    f = f - f.mean(0)
    f = f / f.norm(dim=1, keepdim=True)
    per = []
    for i in range(7):
        pos = [j for j in range(7) if j != i and person[j] == person[i]]
        if not pos:
            continue
        log_norm = math.log(sum(math.exp(float(f[i] @ f[j]) / tau) for j in range(7) if j != i))
        per.append(-sum(float(f[i] @ f[j]) / tau - log_norm for j in pos) / len(pos))
    assert abs(probe.person_contrast(feats, person, tau).item() - sum(per) / len(per)) < 1e-5
    assert probe.person_contrast(feats[:4], torch.arange(4), tau).item() == 0.0


def synthetic(persons, signal, seed, k=4, m=3, c=16, grid=(2, 2, 2)):
    """z (k positions, persons, m modalities, c, *grid): a person code on channels :c//2 (scaled
    by signal), a modality code everywhere, and per-sample noise 5x larger on channels c//2:."""
    g = torch.Generator().manual_seed(seed)
    code = torch.zeros(1, persons, 1, c, *grid)
    code[:, :, :, :c // 2] = torch.randn(1, persons, 1, c // 2, *grid, generator=g) * signal
    mod = torch.randn(1, 1, m, c, *grid, generator=g)
    noise = torch.randn(k, persons, m, c, *grid, generator=g) * 0.1
    noise[:, :, :, c // 2:] *= 50
    return code + mod + noise


@pytest.mark.parametrize("signal", [1.0, 0.0])
def test_fit_recovers_persons_only_where_there_are_persons(signal):
    """Noise 5x the person code on half the channels: unfitted z identifies held-out persons
    poorly, a fitted 1x1 convolution learns to drop those channels; without a person code the
    fit stays near chance (1/8)."""
    torch.manual_seed(0)
    train, test = synthetic(20, signal, 1), synthetic(8, signal, 2, k=1)[0]
    head = nn.Conv3d(16, 16, 1)
    curve = probe.fit(head, list(head.parameters()), train, steps=150, lr=1e-2, tau=0.1, seed=0, log_every=50)
    before = metrics.representation_summary(test.flatten(2))["accuracy_centred"]
    after = probe.score(head, test)["accuracy_centred"]
    if signal:
        assert before < 0.6 and after > 0.9, (before, after)
        assert curve[-1]["loss"] < curve[0]["loss"]
    else:
        assert after < 0.45, after


def test_probe_command(tmp_path):
    """The command on a stage-1 checkpoint at another roi: the encoder's weights carried over (z
    of the unfitted row is the checkpoint's own encoder on the central crop), the fitted rows,
    results.json; heads that do not divide the grid end with one line and no output."""
    import train_pretrain
    import data
    import inference
    import layouts

    root = write_brats(tmp_path / "brats", n=8)
    run = tmp_path / "run"
    train_pretrain.main(["--data", str(root), "--out", str(run), "--max-steps", "1", "--modalities", "t1,t2",
                         "--roi", "32,32,64", "--phi", "rot90", "--feature-size", "12", "--prior-heads", "2",
                         "--workers", "0", "--cache", str(tmp_path / "cache"), "--id-every", "0"])
    out = tmp_path / "probe"
    res = probe.main(["--ckpt", str(run / "last.pt"), "--data", str(root), "--out", str(out), "--roi", "64",
                      "--positions", "2", "--steps", "2", "--cache", str(tmp_path / "cache")])
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["arch"]["roi"] == [64, 64, 64] and len(saved["meta"]["offsets"]) == 2
    assert [r["representation"] for r in saved["rows"]] == ["z", "T(z)", "z' = T(Attn(z, O, O))"]
    assert [r["fitted"] for r in saved["rows"]] == ["no", "yes", "yes"]
    net, meta = inference.load_pretrained(run / "last.pt")
    spec = layouts.resolve(str(root), ["t1", "t2"]).without_labels()
    with torch.no_grad():
        z = torch.stack([torch.cat([net.encode(inference.single(inference.central_crop(
            data.load_case(spec.case(c), spec, tmp_path / "cache").image, ["t1", "t2"], (64, 64, 64)), i))[0]
            for i in range(2)]).flatten(1) for c in meta["split"]["test"]])
    want = metrics.representation_summary(z)
    assert abs(saved["rows"][0]["test ID centred"] - want["accuracy_centred"]) < 1e-9
    assert abs(saved["rows"][0]["between"] - want["between"]) < 1e-6
    assert res["curves"].keys() == {"T(z)", "z' = T(Attn(z, O, O))"}
    with pytest.raises(SystemExit, match="heads must divide its bottleneck grid size 8"):
        probe.main(["--ckpt", str(run / "last.pt"), "--data", str(root), "--out", str(tmp_path / "bad"),
                    "--roi", "64", "--prior-heads", "3", "--cache", str(tmp_path / "cache")])
    assert not (tmp_path / "bad").exists()
    # the SwinUNETR baseline's encoder (no prior of its own) is probed the same way
    train_pretrain.main(["--data", str(root), "--out", str(tmp_path / "base"), "--max-steps", "1", "--modalities",
                         "t1,t2", "--roi", "32,32,64", "--phi", "rot90", "--feature-size", "12", "--preset", "swinunetr",
                         "--workers", "0", "--cache", str(tmp_path / "cache"), "--id-every", "0"])
    base = probe.main(["--ckpt", str(tmp_path / "base" / "last.pt"), "--data", str(root), "--out",
                       str(tmp_path / "probe-base"), "--roi", "64", "--prior-heads", "2", "--positions", "1",
                       "--steps", "1", "--cache", str(tmp_path / "cache")])
    assert [r["fitted"] for r in base["rows"]] == ["no", "yes", "yes"]
    # without --roi: the checkpoint's own roi, not a cube of its first side
    own = probe.encoder_at(probe.Config(ckpt=str(run / "last.pt"), data=str(root), out=""), torch.device("cpu"))
    assert own[2]["roi"] == [32, 32, 64] and own[1].grid == (1, 1, 2)
