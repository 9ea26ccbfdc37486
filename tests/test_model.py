"""model.py against MONAI SwinUNETR and brute-force constructions."""
import itertools
import math

import pytest
import torch
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
from monai.networks.nets.swin_unetr import compute_mask

import model


@pytest.mark.parametrize("fs,size", [(24, (64, 64, 64)), (24, (96, 96, 96)), (24, (64, 96, 32)), (48, (64, 64, 64))])
def test_monai_parity(fs, size):
    torch.manual_seed(fs + size[0])
    ref = MonaiSwinUNETR(in_channels=4, out_channels=3, feature_size=fs).eval()
    ours = model.SwinUNETR(4, 3, feature_size=fs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 4, *size)
    with torch.no_grad():
        want = ref(x)
        for backend in ("naive", "sdpa"):
            for m in ours.modules():
                if hasattr(m, "backend"):
                    m.backend = backend
            assert (ours(x) - want).abs().max().item() < 1e-4, backend


def test_parameter_count():
    ours = model.SwinUNETR(4, 3, feature_size=48)
    assert sum(p.numel() for p in ours.parameters()) == 62_191_941
    assert len(ours.state_dict()) == 159


def test_relative_position_index_brute_force():
    idx = model.relative_position_index((7, 7, 7))
    coords = list(itertools.product(range(7), range(7), range(7)))
    for i in range(0, 343, 17):
        for j in range(0, 343, 13):
            (a, b, c), (d, e, f) = coords[i], coords[j]
            assert idx[i, j] == (a - d + 6) * 169 + (b - e + 6) * 13 + (c - f + 6)
    assert idx.min() == 0 and idx.max() == 2196


@pytest.mark.parametrize("dims,ws,sh", [((14, 14, 14), (7, 7, 7), (3, 3, 3)), ((14, 21, 7), (7, 7, 7), (3, 3, 0))])
def test_shift_mask_brute_force(dims, ws, sh):
    region = model.shift_regions(dims, ws, sh, torch.device("cpu"))
    mask = (region[:, :, None] != region[:, None, :]).float() * -100.0

    def label(p, size, w, s):  # which of the three slices (0:-w), (-w:-s), (-s:) a coordinate is in
        return 0 if p < size - w else (1 if p < size - s else 2)

    nd, nh, nw = (d // w for d, w in zip(dims, ws))
    brute = torch.zeros(nd * nh * nw, ws[0] * ws[1] * ws[2])
    for wi, (a, b, c) in enumerate(itertools.product(range(nd), range(nh), range(nw))):
        for ti, (i, j, k) in enumerate(itertools.product(range(ws[0]), range(ws[1]), range(ws[2]))):
            p = (a * ws[0] + i, b * ws[1] + j, c * ws[2] + k)
            brute[wi, ti] = sum(label(p[x], dims[x], ws[x], sh[x]) * 3 ** (2 - x) for x in range(3))
    want = (brute[:, :, None] != brute[:, None, :]).float() * -100.0
    assert torch.equal(mask, want)
    assert torch.equal(mask, compute_mask(list(dims), ws, sh, torch.device("cpu")))


def test_legacy_merging_order_brute_force():
    torch.manual_seed(0)
    c = 2
    x = torch.randn(1, 4, 4, 4, c)
    pm = model.PatchMerging(c, "legacy")
    cat = torch.cat([x[:, i::2, j::2, k::2] for i, j, k in model.MERGING_ORDERS["legacy"]], -1)
    # The legacy order as written before MONAI 1.5: x0 x1 x2 x3 then x[1,0,1], x[0,1,0], x[0,0,1], x[1,1,1].
    brute = torch.zeros(1, 2, 2, 2, 8 * c)
    offs = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
    for a, b, e in itertools.product(range(2), range(2), range(2)):
        brute[0, a, b, e] = torch.cat([x[0, 2 * a + i, 2 * b + j, 2 * e + k] for i, j, k in offs])
    assert torch.equal(cat, brute)
    with torch.no_grad():
        assert torch.allclose(pm(x), pm.reduction(pm.norm(brute)))
    assert not torch.equal(cat, torch.cat([x[:, i::2, j::2, k::2] for i, j, k in model.MERGING_ORDERS["monai"]], -1))


def tiny(prior=True, **kw):
    return model.PersonalizedSwinUNETR(2, 2, feature_size=12, roi=(64, 64, 64), prior=prior, prior_heads=2, **kw)


def test_full_backward_reaches_every_parameter():
    torch.manual_seed(0)
    net = tiny()
    x = torch.randn(1, 2, 64, 64, 64)
    z, skips = net.encode(x)
    xh = net.personalize(z)
    loss = net.decode(xh, skips, x).pow(2).mean() + net.equivariance_logits(z).sum() + net.embed(z).sum()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net.prior.grad.abs().sum() > 0


def test_no_prior_is_identity_and_has_no_prior_parameters():
    net = tiny(prior=False)
    z = torch.randn(1, 192, 2, 2, 2)
    assert net.personalize(z) is z
    assert not any(n.startswith(("prior", "transfer", "fuse")) for n, _ in net.named_parameters())


def test_equivariance_head_reads_the_grid_minus_its_mean():
    """F_equ ignores what a rotation of the grid leaves unchanged (a per-channel constant over
    the grid) and sees what it changes (where on the grid a feature sits); g sees both."""
    torch.manual_seed(0)
    net = tiny()
    z = torch.randn(2, 192, 2, 2, 2)
    shifted = z + torch.randn(2, 192, 1, 1, 1)
    assert (net.equivariance_logits(shifted) - net.equivariance_logits(z)).abs().max() < 1e-5
    assert (net.embed(shifted) - net.embed(z)).abs().max() > 1e-3
    turned = torch.rot90(z, 1, (-2, -1))
    assert (net.equivariance_logits(turned) - net.equivariance_logits(z)).abs().max() > 1e-3
    head = net.equ_head
    want = head.fc(torch.nn.functional.gelu(head.reduce(z - z.mean((2, 3, 4), keepdim=True))).flatten(1))
    assert torch.allclose(net.equivariance_logits(z), want, atol=1e-6)


def test_prior_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = model.PriorAttention(27, 3)
    ref = torch.nn.MultiheadAttention(27, 3, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    q, prior = torch.randn(2, 96, 27), torch.randn(96, 27)
    want = ref(q, prior.expand(2, -1, -1), prior.expand(2, -1, -1))[0]
    for backend in ("naive", "sdpa"):
        ours.backend = backend
        assert (ours(q, prior) - want).abs().max() < 1e-5


def test_cosine_prior_attention_is_swin_v2_scaled_cosine():
    """logits="cosine": softmax(cos(q, k) * min(exp(s), 100)) v, written out head by head from
    MultiheadAttention's projections; gradients reach the scale; the logits clamp at 100."""
    torch.manual_seed(0)
    ours = model.PriorAttention(8, 2, logits="cosine")
    with torch.no_grad():
        ours.logit_scale.copy_(torch.tensor([math.log(7.0), math.log(500.0)]).view(2, 1, 1))
    query, prior = torch.randn(2, 48, 8), torch.randn(48, 8)
    wq, wk, wv = ours.in_proj_weight.chunk(3)
    bq, bk, bv = ours.in_proj_bias.chunk(3)
    q, k, v = query @ wq.T + bq, prior @ wk.T + bk, prior @ wv.T + bv
    heads, probs = [], []
    for h, scale in enumerate((7.0, 100.0)):
        sl = slice(4 * h, 4 * h + 4)
        cos = torch.nn.functional.cosine_similarity(q[:, :, None, sl], k[None, None, :, sl], dim=-1)
        p = (cos * scale).softmax(-1)
        probs.append(p)
        heads.append(p @ v[:, sl])
    want = ours.out_proj(torch.cat(heads, -1))
    for backend in ("naive", "sdpa"):
        ours.backend = backend
        assert (ours(query, prior) - want).abs().max() < 1e-5, backend
    assert (ours.probabilities(query, prior) - torch.stack(probs, 1)).abs().max() < 1e-5
    ours(query, prior).square().sum().backward()
    assert ours.logit_scale.grad[0].abs() > 0 and ours.logit_scale.grad[1].abs() == 0  # clamped head
    with pytest.raises(ValueError, match="prior attention logits"):
        model.PriorAttention(8, 2, logits="sharp")


def test_prior_logits_travel_in_the_architecture_record():
    arch = {"kind": "personalized", "in_channels": 2, "out_channels": 2, "feature_size": 12, "roi": [64, 64, 64],
            "prior": True, "prior_heads": 2, "phi": "rot90-yz"}
    assert model.build_model(arch).prior_attn.logits == "dot"
    cos = model.build_model({**arch, "prior_logits": "cosine"})
    assert cos.prior_attn.logits == "cosine" and "prior_attn.logit_scale" in cos.state_dict()
    assert model.same_network(arch, {**arch, "prior_logits": "dot"})
    assert not model.same_network(arch, {**arch, "prior_logits": "cosine"})
    assert model.same_network(arch, {**arch, "prior_fuse": "concat"})
    assert not model.same_network(arch, {**arch, "prior_fuse": "residual"})
    assert not model.same_network(arch, {**arch, "prior_fuse": "prior"})
    with pytest.raises(ValueError, match="prior fuse"):
        model.build_model({**arch, "prior_fuse": "sum"})


def _paper_and_fuse(form):
    """The paper's fuse form, the same weights in `form`, and a bottleneck z (roi 64^3, F=12)."""
    torch.manual_seed(0)
    paper = model.PersonalizedSwinUNETR(2, 2, feature_size=12, roi=(64, 64, 64), prior_heads=2).eval()
    other = model.PersonalizedSwinUNETR(2, 2, feature_size=12, roi=(64, 64, 64), prior_heads=2, prior_fuse=form).eval()
    other.load_state_dict(paper.state_dict())
    return paper, other, torch.randn(1, 192, 2, 2, 2)


def test_prior_fuse_reaches_z_only_through_the_prior_attention():
    """prior_fuse="prior": X_h' = Fuse([0, z']), written out from the weights of the paper's form;
    it has no part via z, and with z' fixed z's own gradient to it is zero."""
    paper, only, z = _paper_and_fuse("prior")
    with torch.no_grad():
        z2 = paper.prior_branch(z)
        want = torch.nn.functional.conv3d(z2, paper.fuse.weight[:, 192:], paper.fuse.bias, padding=1)
        assert (only.personalize(z) - want).abs().max() < 1e-5
        assert (paper.personalize(z) - want).abs().max() > 1e-2  # the paper's form also has z's half
        r = only.representations(z)
        assert r["X_h' via z"].abs().max() == 0
        assert (r["X_h'"] - r["X_h' via z'"] - paper.fuse.bias.view(1, -1, 1, 1, 1)).abs().max() < 1e-5
    # the prior branch's output fixed, z's own gradient to X_h' is zero
    z = z.requires_grad_()
    (g,) = torch.autograd.grad(only._fuse(z, z2.detach()).sum(), z, allow_unused=True, materialize_grads=True)
    assert g.abs().max() == 0


def test_residual_fuse_adds_z_to_the_papers_fuse():
    """prior_fuse="residual": X_h' = z + Fuse([z, z']) with the weights of the paper's form, and
    the prior share measures the part that z' changes in both."""
    paper, res, z = _paper_and_fuse("residual")
    with torch.no_grad():
        assert (res.personalize(z) - (z + paper.personalize(z))).abs().max() < 1e-5
        assert (res.representations(z)["X_h'"] - res.personalize(z)).abs().max() < 1e-6
        # X_h' is its part via z plus its part via z' plus one constant, in both fuse forms
        for net in (paper, res):
            rest = [(r["X_h'"] - r["X_h' via z"] - r["X_h' via z'"]) for r in map(net.representations, (z, 3 * z - 1))]
            assert (rest[0] - rest[1]).abs().max() < 1e-4
            assert (rest[0] - net.fuse.bias.view(1, -1, 1, 1, 1)).abs().max() < 1e-4  # Fuse of zeros: its bias
        z2 = paper.prior_branch(z)
        change = paper.fuse(torch.cat([z, z2], 1)) - paper.fuse(torch.cat([z, torch.zeros_like(z)], 1))
        xh = res.personalize(z)
        assert res.prior_share(z, xh) == pytest.approx(float(change.norm() / xh.norm()), rel=1e-4)
        # the prior's part, written out from Fuse's own convolution, and X_h' with it from one pass
        for net in (paper, res):
            z2 = net.prior_branch(z)
            zero = torch.zeros_like(z)
            want = net.fuse(torch.cat([zero, z2], 1)) - net.fuse(torch.cat([zero, zero], 1))
            xh, part = net.personalize_with_part(z)
            assert (part - want).abs().max() < 1e-4 * want.abs().max() and want.abs().max() > 0
            assert (xh - net.personalize(z)).abs().max() < 1e-6


def test_grid_mismatch_and_bad_sizes_are_clear_errors():
    net = tiny()
    with pytest.raises(ValueError, match="prior was built for a bottleneck grid"):
        net.personalize(torch.randn(1, 192, 3, 3, 3))
    with pytest.raises(ValueError, match="not divisible by 32"):
        net.encode(torch.randn(1, 2, 64, 64, 50))
    with pytest.raises(ValueError, match="must divide"):
        model.PersonalizedSwinUNETR(2, 2, feature_size=12, roi=(96, 96, 96), prior_heads=4)


def test_activation_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    a = model.SwinUNETR(2, 2, feature_size=12)
    b = model.SwinUNETR(2, 2, feature_size=12, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 32, 32, 64)
    la, lb = a(x).square().mean(), b(x).square().mean()
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


# ---- loaders --------------------------------------------------------------------------------


def fake_ssl_checkpoint(fs=12):
    """Tang et al. model_swinvit.pt key names: module.* with mlp.fc1/fc2, 1 input channel, plus heads."""
    src = model.SwinUNETR(1, 1, feature_size=fs).swinViT.state_dict()
    sd = {"module." + k.replace("mlp.linear1.", "mlp.fc1.").replace("mlp.linear2.", "mlp.fc2."): torch.randn_like(v.float()).to(v.dtype)
          for k, v in src.items()}
    sd["module.rotation_head.weight"] = torch.randn(4, 16 * fs)
    sd["module.contrastive_head.weight"] = torch.randn(512, 16 * fs)
    sd["module.conv.0.weight"] = torch.randn(8, 16 * fs, 3, 3, 3)
    return {"epoch": 10, "state_dict": sd}


def test_load_ssl_tiles_patch_embedding(tmp_path):
    ck = fake_ssl_checkpoint()
    torch.save(ck, tmp_path / "model_swinvit.pt")
    net = model.SwinUNETR(4, 3, feature_size=12)
    report = model.load_ssl_swinvit(net, tmp_path / "model_swinvit.pt", patch_embed="tile", log=lambda s: None)
    sd = net.state_dict()
    src = ck["state_dict"]
    assert torch.equal(sd["swinViT.layers2.0.blocks.1.mlp.linear1.weight"], src["module.layers2.0.blocks.1.mlp.fc1.weight"])
    assert torch.equal(sd["swinViT.layers4.0.downsample.reduction.weight"], src["module.layers4.0.downsample.reduction.weight"])
    w1 = src["module.patch_embed.proj.weight"]
    assert torch.allclose(sd["swinViT.patch_embed.proj.weight"], w1.repeat(1, 4, 1, 1, 1) / 4)
    # one modality repeated on the 4 channels gives the 1-channel network's embedding
    x = torch.randn(1, 1, 8, 8, 8)
    one = torch.nn.functional.conv3d(x, w1, src["module.patch_embed.proj.bias"], stride=2)
    assert torch.allclose(net.swinViT.patch_embed(x.repeat(1, 4, 1, 1, 1)), one, atol=1e-5)
    assert all(k.startswith(("encoder", "decoder", "out")) for k in report["missing"])
    assert len(report["matched"]) == len([k for k in sd if k.startswith("swinViT.")])


def test_load_ssl_fails_when_encoder_key_missing():
    ck = fake_ssl_checkpoint()
    del ck["state_dict"]["module.layers3.0.blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="encoder"):
        model.load_ssl_swinvit(model.SwinUNETR(4, 3, feature_size=12), ck, log=lambda s: None)


def test_load_monai_state_dict_with_module_prefix(tmp_path):
    ref = MonaiSwinUNETR(in_channels=2, out_channels=2, feature_size=12)
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "m.pt")
    net = model.PersonalizedSwinUNETR(2, 2, feature_size=12, roi=(64, 64, 64), prior_heads=2)
    report = model.load_monai(net, tmp_path / "m.pt", log=lambda s: None)
    assert len(report["matched"]) == 159
    assert set(report["missing"]) == {k for k in net.state_dict() if not k in ref.state_dict()}
    for k, v in ref.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    with pytest.raises(ValueError, match="shape"):
        model.load_monai(model.SwinUNETR(3, 2, feature_size=12), ref.state_dict(), log=lambda s: None)


def fake_reference_checkpoint(fs=12, out=2, grid=(2, 2, 2)):
    """The reference code's SSLHead names (swinViT1, static_prior, attn_for_x, tansfer_for_mod,
    fuse_to_X over 3*16F channels, unused attn_for_mod and single-token heads, encoder/decoder/out)
    for a bottleneck grid of roi / 32, 2 prior heads."""
    dim = 16 * fs
    base = model.SwinUNETR(2, out, feature_size=fs).state_dict()
    sd = {("swinViT1." + k[len("swinViT."):] if k.startswith("swinViT.") else k): torch.randn_like(v.float()).to(v.dtype)
          for k, v in base.items()}
    mha = torch.nn.MultiheadAttention(math.prod(grid), 2, batch_first=True).state_dict()
    sd.update({"attn_for_x." + k: torch.randn_like(v) for k, v in mha.items()})
    sd.update({"attn_for_mod." + k: torch.randn_like(v) for k, v in mha.items()})
    sd["static_prior"] = torch.randn(1, dim, *grid)
    for i in (0, 1):
        sd[f"tansfer_for_mod.{i}.weight"] = torch.randn(dim, dim, 3, 3, 3) * 0.01
        sd[f"tansfer_for_mod.{i}.bias"] = torch.randn(dim)
    sd["fuse_to_X.weight"] = torch.randn(dim, 3 * dim, 3, 3, 3) * 0.01
    sd["fuse_to_X.bias"] = torch.randn(dim)
    sd["rotation_head.weight"], sd["rotation_head.bias"] = torch.randn(4, dim), torch.randn(4)
    sd["contrastive_head.weight"], sd["contrastive_head.bias"] = torch.randn(512, dim), torch.randn(512)
    return sd


def test_load_reference_checkpoint_and_fold():
    sd = fake_reference_checkpoint()
    net = model.PersonalizedSwinUNETR(2, 2, feature_size=12, roi=(64, 64, 64), prior_heads=2).eval()
    report = model.load_reference(net, {"state_dict": sd}, log=lambda s: None)
    own = net.state_dict()
    assert torch.equal(own["prior"], sd["static_prior"][0])
    assert torch.equal(own["prior_attn.in_proj_weight"], sd["attn_for_x.in_proj_weight"])
    assert torch.equal(own["transfer.1.weight"], sd["tansfer_for_mod.1.weight"])
    assert torch.equal(own["swinViT.layers3.0.blocks.1.attn.qkv.weight"], sd["swinViT1.layers3.0.blocks.1.attn.qkv.weight"])
    assert torch.equal(own["decoder2.conv_block.conv1.conv.weight"], sd["decoder2.conv_block.conv1.conv.weight"])
    assert set(report["missing"]) == {k for k in own if k.startswith(("equ_head", "proj_head"))}
    # the [z, z', z] conv and the folded [z, z'] conv are the same function
    z, z2 = torch.randn(1, 192, 2, 2, 2), torch.randn(1, 192, 2, 2, 2)
    w, b = sd["fuse_to_X.weight"], sd["fuse_to_X.bias"]
    unfolded = torch.nn.functional.conv3d(torch.cat([z, z2, z], 1), w, b, padding=1)
    with torch.no_grad():
        assert torch.allclose(net.fuse(torch.cat([z, z2], 1)), unfolded, atol=1e-4)
    # whole bottleneck against the reference formulation written out here
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    mha.load_state_dict({k[len("attn_for_x."):]: v for k, v in sd.items() if k.startswith("attn_for_x.")})
    prior = sd["static_prior"]
    with torch.no_grad():
        xo = mha(z.flatten(2), prior.flatten(2), prior.flatten(2))[0].reshape(z.shape)
        for i in (0, 1):
            xo = torch.nn.functional.conv3d(xo, sd[f"tansfer_for_mod.{i}.weight"], sd[f"tansfer_for_mod.{i}.bias"], padding=1)
        want = torch.nn.functional.conv3d(torch.cat([z, xo, z], 1), w, b, padding=1)
        assert torch.allclose(net.personalize(z), want, atol=1e-4)


@pytest.mark.parametrize("shift", [False, True])
def test_window_attention_backends_agree_with_gradients(shift):
    torch.manual_seed(0)
    heads, hd, ws = 3, 8, (7, 7, 7)
    dims = (14, 14, 7)
    n, nw = 343, 4
    region = model.shift_regions(dims, ws, (3, 3, 0), torch.device("cpu")) if shift else None
    qkv = torch.randn(2 * nw, n, 3, heads, hd, dtype=torch.float64, requires_grad=True)
    table = (torch.randn(2197, heads, dtype=torch.float64) * 0.1).requires_grad_()
    index = model.relative_position_index(ws)
    results = {}
    for backend in ("naive", "sdpa"):
        out = model.window_attention(qkv, table, index, region, backend)
        gq, gt = torch.autograd.grad((out * torch.cos(out)).sum(), (qkv, table))
        results[backend] = (out, gq, gt)
    for a, b in zip(results["naive"], results["sdpa"]):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)
    with torch.no_grad():  # float32 through the fused CPU kernel: batch 2 x 4 windows, per-window masks
        fused = model.window_attention(qkv.float(), table.float(), index, region, "sdpa")
    assert torch.allclose(fused.double(), results["naive"][0], atol=1e-5)


def test_channels_last_instance_norm_matches_float64():
    """The decoder's channels-last instance norm: values and gradients against float64
    F.instance_norm, on a volume whose mean is large against its spread (where batch norm's
    channels-last statistics are off by 4e-4)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 40, 48, 36) * 3 + 20
    xd = x.double().requires_grad_()
    want = torch.nn.functional.instance_norm(xd, eps=1e-5)
    g = torch.randn_like(x)
    want.backward(g.double())
    xc = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    got = model.inorm(xc)
    got.backward(g)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert (got.double() - want).abs().max().item() < 5e-6
    assert (xc.grad.double() - xd.grad).abs().max().item() < 1e-4 * xd.grad.abs().max().item()
