"""Stage 1: pre-training (Algorithm 1 of the paper, as METHOD.md states it).

    python train_pretrain.py --data demo --out runs/pretrain --max-steps 200
    torchrun --nproc_per_node=4 train_pretrain.py --data /data/BraTS2021 --out runs/pt

One step, for each person of the batch and each modality i in random order: transform the
modality by phi^i, repeat it on all |M| input channels, encode it (z), build the views
(positive: same geometry; negative: another geometry; other persons of the global batch),
compute L_contr, L_equ on z, the personalized X_h^i' (prior), L_inv against the running
anchor, decode all |M| modalities and undo phi^i for L_decom. backward() per modality; one
optimizer step per person-batch.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import layouts
import inference
import losses
import metrics
import model as M
import runtime as R
import sampling
from model import build_model

# Table 7 of the supplementary: which constraints and whether the prior is used. "pers", "pers_zp",
# "var" and "cov" are options beside the paper's losses (L_pers, losses.person_nce, on X_h' or on
# its part through the prior branch; L_var, losses.person_variance; L_cov, losses.person_spread):
# off in presets 1-6 and swinunetr.
PRESETS = {
    "1": dict(contr=True, equ=True, inv=False, prior=False),
    "2": dict(contr=True, equ=False, inv=True, prior=False),
    "3": dict(contr=True, equ=True, inv=True, prior=False),
    "4": dict(contr=True, equ=True, inv=False, prior=True),
    "5": dict(contr=True, equ=False, inv=True, prior=True),
    "6": dict(contr=True, equ=True, inv=True, prior=True),
    "6p": dict(contr=True, equ=True, inv=True, prior=True, pers=True),
    "6pz": dict(contr=True, equ=True, inv=True, prior=True, pers_zp=True),
    "6v": dict(contr=True, equ=True, inv=True, prior=True, var=True),
    "6vc": dict(contr=True, equ=True, inv=True, prior=True, var=True, cov=True),
    "swinunetr": dict(contr=False, equ=False, inv=False, prior=False),
}
PRESETS = {k: {"pers": False, "pers_zp": False, "var": False, "cov": False, **v} for k, v in PRESETS.items()}
PRESETS["full"] = PRESETS["6"]
TERMS = ("contr", "equ", "inv", "pers", "pers_zp", "var", "cov", "decom")
DECOM_SKIPS = ("all", "none")
# What log.jsonl holds beside the losses (docs/training.md, "What the log shows").
DIAGNOSTICS = ("grad_norm", "grad_share", "prior_change", "prior_share", "xh_rms", "equ_acc", "contr_acc",
               "id_acc", "id_cos_same", "id_cos_other", "id_acc_centred", "id_between", "id_between_z", "id_between_zp",
               "id_between_dims", "id_spread_via_zp", "id_attention_entropy")


@dataclass
class Config(R.TrainConfig):
    out: str = R.opt("runs/pretrain", "folder for checkpoints, log and figures")
    clip: float = R.opt(0.0, "gradient norm clipping (0 = off, as in the reference code: clipping at 1 pushed the "
                             "prior's gradient below Adam's epsilon)")
    preset: str = R.opt("full", "constraint set: 1..6 (Table 7), full (= 6), swinunetr (plain, L_decom only), 6p "
                                "(6 + L_pers: other persons as negatives for X_h', an option beside the paper), 6pz "
                                "(6 + L_pers on X_h''s part through the prior branch, with --same-views), 6v "
                                "(6 + L_var: a floor on the spread of X_h' across persons, another option) or 6vc "
                                "(6v + L_cov: that spread along many directions, not one)")
    roi: str = R.opt("96", "crop size, one side or D,H,W, multiples of 32")
    feature_size: int = R.opt(48, "Swin feature size F (multiple of 12)")
    prior_heads: int = R.opt(3, "heads of the prior attention (must divide (roi/32)^3)")
    prior_logits: str = R.opt("dot", "the prior attention's logits: dot (the paper's q k^T / sqrt(d)) or cosine "
                                     "(Swin V2's scaled cosine, a learnable scale per head: an option that lets it "
                                     "select)", choices=M.PRIOR_ATTENTION)
    prior_fuse: str = R.opt("concat", "how X_h' joins z and the prior branch's z': concat (the paper's Fuse([z, z'])) or "
                                      "residual (z + Fuse([z, z']), an option that keeps z in X_h') or prior "
                                      "(Fuse([0, z']), an option that leaves z no route around the prior attention)",
                            choices=M.PRIOR_FUSE)
    decom_skips: str = R.opt("all", "what L_decom's decoder gets beside X_h': all (the paper's: the encoder's skips and "
                                    "the input) or none (zeros in their place, so X_h' alone must carry what it "
                                    "reconstructs: an option asking whether the skips are why X_h' needs no person)",
                             choices=DECOM_SKIPS)
    phi: str = R.opt("rot90-yz", "geometric transforms: rot90-yz (4 rotations in the sagittal y-z plane, the "
                                 "reference code's), rot90 (in the axial x-y plane) or cube (24 rotations)",
                     choices=sampling.PHI_KINDS)
    modalities: str = R.opt("", "comma-separated subset and order of modalities (default: all of the data set)")
    w_contr: float = R.opt(1.0, "weight of L_contr")
    w_equ: float = R.opt(1.0, "weight of L_equ")
    w_inv: float = R.opt(1.0, "weight of L_inv")
    w_decom: float = R.opt(1.0, "weight of L_decom")
    w_pers: float = R.opt(1.0, "weight of L_pers (preset 6p)")
    w_pers_zp: float = R.opt(1.0, "weight of L_pers on the prior branch's part of X_h' (preset 6pz)")
    w_var: float = R.opt(1.0, "weight of L_var (presets 6v, 6vc)")
    w_cov: float = R.opt(1.0, "weight of L_cov (preset 6vc)")
    var_floor: float = R.opt(0.5, "L_var: the standard deviation across persons asked of every entry of the "
                                  "channel-standardised X_h' (1: as spread as unrelated vectors)")
    pers_centre: bool = R.opt(False, "L_pers on vectors centred on the other persons' mean (losses.person_nce), as "
                                     "centred identification compares them")
    pers_queue: int = R.opt(16, "L_pers and L_var: earlier persons kept as the other persons (their anchors), beside "
                                "the global batch")
    same_views: bool = R.opt(False, "every person of a step's global batch cropped at the same relative position and "
                                    "turned by the same phi, and L_pers, L_var and L_cov taken over the persons of the "
                                    "global batch at each modality (no queue): what they ask for is then between "
                                    "persons, not between crop positions or rotations (needs a global batch of 2 or "
                                    "more)")
    tau: float = R.opt(0.1, "InfoNCE temperature")
    grad_views: bool = R.opt(False, "back-propagate through the encodings of the positive and negative views")
    compile: bool = R.opt(False, "torch.compile the encoder and decoder blocks")
    id_every: int = R.opt(50, "person identification on the val persons every N steps and at the end (0: never)")


def per_sample(fn, x, ks, kind):
    """fn(x[b], ks[b]) for every sample of a batch (each person has its own transform)."""
    return torch.stack([fn(x[b], int(ks[b]), kind) for b in range(x.shape[0])])


def modality_step(net, x, fg, i, rngs, gens, cfg, use, anchors, n_classes, queue=None, persons=None, turn=None):
    """Losses of one modality i of the batch x (B, |M|, D, H, W); returns (terms, new anchors,
    diagnostics). anchors: the running anchors of the persons' earlier modalities (None at the
    first), "xh" of X_h' and, for L_pers on the prior's part (preset 6pz), "zp" of X_h' via z'.
    rngs / gens: one numpy and one torch generator per person (its transforms and
    views); turn (--same-views): a generator shared by the global batch, whose draw turns every
    person. L_pers and L_var only: persons (B,) the batch's person indices, queue (anchors, persons) of
    earlier persons, the others beside the global batch's. Diagnostics:
    accuracy of F_equ and of the contrastive task on this batch, RMS of X_h' and the prior's
    share of it (model.prior_share)."""
    b, m = x.shape[:2]
    anchors = dict(anchors or {})
    anchor = anchors.get("xh")
    ks = [r.integers(n_classes) for r in rngs] if turn is None else [turn.integers(n_classes)] * b
    ks = torch.as_tensor(ks, device=x.device)
    u = per_sample(sampling.phi, x[:, i:i + 1], ks, cfg.phi).repeat(1, m, 1, 1, 1)  # (B, |M|, roi)
    z, skips = net.encode(u)
    terms, diag = {}, {}
    if use["contr"]:
        k_neg = [r.integers(1, n_classes) for r in rngs]  # phi' != identity
        pos = torch.stack([sampling.augment(u[j], gens[j]) for j in range(b)])
        neg = per_sample(sampling.phi, u, k_neg, cfg.phi)
        neg = torch.stack([sampling.augment(neg[j], gens[j]) for j in range(b)])
        with torch.set_grad_enabled(cfg.grad_views):  # both views in one batch (all norms are per sample)
            e_pos, e_neg = net.embed(net.encode(torch.cat([pos, neg]))[0]).chunk(2)
        e = net.embed(z)
        others, offset = losses.gather_with_grad(e)
        logits = losses.nce_logits(e, e_pos, e_neg, others, offset, cfg.tau)
        terms["contr"] = losses.nce_loss(logits)
        diag["contr_acc"] = losses.accuracy(logits, 0).item()
    if use["equ"]:
        logits = net.equivariance_logits(z)  # on z, before the prior
        terms["equ"] = losses.equivariance_loss(logits, ks)
        diag["equ_acc"] = losses.accuracy(logits, ks).item()
    personalized = isinstance(net, M.PersonalizedSwinUNETR)
    if use["pers_zp"]:
        xh, part = net.personalize_with_part(z)
    else:
        xh = net.personalize(z) if personalized else z
    diag["xh_rms"] = xh.detach().float().square().mean().sqrt().item()
    if personalized and net.use_prior:
        diag["prior_share"] = net.prior_share(z, xh)
    if use["inv"]:
        terms["inv"] = losses.invariance_loss(xh, anchor)  # on X_h', after the prior
    if use["pers"]:
        if anchor is None:
            others, who = None, None
        else:  # with the same views only this step's persons, seen where and as this person is
            others, who = global_batch(anchor, persons) if cfg.same_views else remember(
                queue, global_batch(anchor, persons), None)
        terms["pers"] = losses.person_nce(xh, anchor, others, persons, who, cfg.tau, cfg.pers_centre)
    if use["var"] or use["cov"]:  # other persons: the queue, and this step's global batch once it has anchors
        if cfg.same_views:  # or the global batch's X_h' of this modality, seen as this person's is
            pool = global_batch(xh, persons)
        else:
            pool = queue if anchor is None else remember(queue, global_batch(anchor, persons), None)
        others, who = pool if pool is not None else (None, None)
        if use["var"]:
            terms["var"] = losses.person_variance(xh, others, persons, who, cfg.var_floor)
        if use["cov"]:
            terms["cov"] = losses.person_spread(xh, others, persons, who)
    if use["pers_zp"]:  # the prior's part against the same part of this step's other persons
        prev = anchors.get("zp")
        others, who = (None, None) if prev is None else global_batch(prev, persons)
        terms["pers_zp"] = losses.person_nce(part, prev, others, persons, who, cfg.tau, cfg.pers_centre)
        anchors["zp"] = losses.update_anchor(prev, part)
    if use["inv"] or use["pers"] or use["var"] or use["cov"]:
        anchors["xh"] = losses.update_anchor(anchor, xh)
    if cfg.decom_skips == "none":  # the decoder sees X_h' alone
        skips, u = [torch.zeros_like(s) for s in skips], torch.zeros_like(u)
    y = per_sample(sampling.phi_inverse, net.decode(xh, skips, u), ks, cfg.phi)
    terms["decom"] = losses.decomposition_loss(y, x, fg, cfg.w_fg)
    return terms, anchors, diag


def global_batch(anchor, persons):
    """(anchors, person indices) of every rank's batch, stop-gradient."""
    return losses.gather_with_grad(anchor.detach())[0], losses.gather_with_grad(persons)[0]


def remember(queue, new, size):
    """The newest `size` (anchors, person indices) of L_pers: `new`'s before the queue's."""
    if queue is None:
        return tuple(t[:size] for t in new)
    return tuple(torch.cat([a, b.to(a.device)])[:size] for a, b in zip(new, queue))


def identification(net, vols, names, roi, device):
    """The mechanism on the volumes `vols` (data.Volume), by the network in eval mode (put back in
    training mode after): person identification from X_h' raw and centred, the between-person
    fraction of the spread of z, z' and X_h', the share of X_h''s spread in its part through z'
    (model.representations), and the prior attention's entropy over its maximum, as the log's
    id_* entries."""
    net.eval()
    tables = inference.representation_tables(net, (v.image for v in vols), names, roi, device)
    net.train()
    xh = metrics.representation_summary(tables["X_h'"])
    out = {"id_acc": xh["accuracy"], "id_chance": xh["chance"], "id_cos_same": xh["cos_same"],
           "id_cos_other": xh["cos_other"], "id_acc_centred": xh["accuracy_centred"], "id_between": xh["between"],
           "id_between_dims": xh["between_dims"], "id_between_z": metrics.variance_decomposition(tables["z"])["between"]}
    if "z'" in tables:
        out["id_between_zp"] = metrics.variance_decomposition(tables["z'"])["between"]
        out["id_spread_via_zp"] = metrics.variance_decomposition(tables["X_h' via z'"])["total"] / max(xh["total"], 1e-30)
        out["id_attention_entropy"] = float(tables["attention"].mean())
    return out


def main(argv=None):
    cfg = R.parse_config(Config, argv, __doc__.split("\n\n")[0])
    if cfg.preset not in PRESETS:
        raise SystemExit(f"--preset {cfg.preset}: choose one of {', '.join(PRESETS)}")
    use = PRESETS[cfg.preset]
    use = {**use, "decom": True}
    roi = R.roi_tuple(cfg.roi)
    turned = [roi[a] for a in sampling.rotated_axes(cfg.phi)]
    if len(set(turned)) > 1:
        raise SystemExit(f"--roi {cfg.roi}: the {cfg.phi} transforms rotate the crop, so its rotated sides must be "
                         "equal (rot90: D = H; rot90-yz: H = W; cube: all three)")
    d = R.setup_distributed(cfg.device)
    R.seed_everything(cfg.seed)  # same initial weights on every rank (also broadcast below)
    out = Path(cfg.out)

    # Self-supervised: no label file is read, crops are centred on the brain / body foreground.
    names = [s for s in cfg.modalities.split(",") if s] or None
    spec = layouts.resolve(cfg.data, names, cfg.labels or None).without_labels()
    split = data.make_split(spec, cfg.seed, cfg.val_fraction, cfg.test_fraction,
                            out / "split.json" if d.main else None)
    R.barrier(d)
    if not d.main:
        split = data.make_split(spec, cfg.seed, cfg.val_fraction, cfg.test_fraction, out / "split.json")
    nm = len(spec.modalities)
    arch = {"kind": "swinunetr" if cfg.preset == "swinunetr" else "personalized", "in_channels": nm,
            "out_channels": nm, "feature_size": cfg.feature_size, "roi": list(roi), "prior": use["prior"],
            "prior_heads": cfg.prior_heads, "prior_logits": cfg.prior_logits,
            "prior_fuse": cfg.prior_fuse, "phi": cfg.phi, "merging": "monai", "attn_backend": cfg.attn_backend,
            "checkpointing": cfg.checkpointing}
    net = build_model(arch).to(d.device)
    R.broadcast_parameters(net, d)
    if cfg.compile:
        net.swinViT.compile()
        for name in ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
                     "decoder5", "decoder4", "decoder3", "decoder2", "decoder1"):
            getattr(net, name).compile()
    params, optim = R.make_optimizer(net, cfg)
    branch = net.prior_parameters() if isinstance(net, M.PersonalizedSwinUNETR) else []
    prior_init = net.prior.detach().clone() if branch else None
    sched = torch.optim.lr_scheduler.LambdaLR(optim, R.lr_lambda(cfg.warmup, cfg.max_steps, cfg.cosine))

    start, queue = 0, None
    ck_path = R.resume_path(out, cfg.resume)
    if ck_path is not None:
        ck = R.restore_state(ck_path, net, optim, sched, d)
        older = {"preset": None, "seed": None, "decom_skips": "all", "same_views": False,
                 "pers_centre": False}  # of older checkpoints
        made = {k: ck["config"].get(k, v) for k, v in older.items()}
        asked = {k: getattr(cfg, k) for k in made}
        if made != asked:
            raise SystemExit(f"{ck_path}: made with " + " ".join(f"{k} {v}" for k, v in made.items())
                             + "; this run asks for " + " ".join(f"{k} {v}" for k, v in asked.items()))
        problems = data.compare_contract(ck["contract"], data.contract(spec))
        if problems:
            raise SystemExit(f"{ck_path}: data differ from the checkpoint's: " + "; ".join(problems))
        start = ck["step"]
        if branch and ck.get("prior_init") is not None:
            prior_init = ck["prior_init"].to(d.device)
        if ck.get("pers_queue") is not None:
            queue = tuple(t.to(d.device) for t in ck["pers_queue"])
        R.log(f"resumed from {ck_path} at step {start}", d)
    cache = cfg.cache or None
    index = {c: k for k, c in enumerate(split["train"])}  # person indices of L_pers
    if cfg.same_views and cfg.batch_size * d.world < 2:
        raise SystemExit(f"--same-views: a global batch of {cfg.batch_size * d.world} person; it compares the "
                         "persons of a global batch (--batch-size 2 or more)")
    if use["pers_zp"] and not cfg.same_views:
        raise SystemExit(f"--preset {cfg.preset}: L_pers on the prior's part compares the persons of a step at the "
                         "same views; add --same-views (and a global batch of 2 or more)")
    if use["cov"] and cfg.same_views and cfg.batch_size * d.world < 3:
        raise SystemExit(f"--preset {cfg.preset} --same-views: a global batch of {cfg.batch_size * d.world} persons; "
                         "L_cov compares the directions between 3 or more (--batch-size 3 or more)")
    loader = R.train_loader(spec, split["train"], roi, cfg.batch_size, cfg.max_steps, start, cfg.seed, d,
                            cfg.workers, 1.0, cache, same_position=cfg.same_views)
    jlog = R.JsonlLog(out / "log.jsonl", d.main, resume_step=start if ck_path else None)
    guard = R.NonFiniteGuard(cfg.max_nonfinite, d)
    weights = {"contr": cfg.w_contr, "equ": cfg.w_equ, "inv": cfg.w_inv, "pers": cfg.w_pers,
               "pers_zp": cfg.w_pers_zp, "var": cfg.w_var,
               "cov": cfg.w_cov, "decom": cfg.w_decom}
    n_classes = sampling.n_phi(cfg.phi)
    identify = cfg.id_every > 0 and len(split["val"]) >= 2 and nm >= 2
    if cfg.id_every > 0 and not identify:
        R.log(f"no person identification in the log: it needs 2 val persons and 2 modalities "
              f"({len(split['val'])} and {nm} here)", d)
    val_vols = [data.load_case(spec.case(c), spec, cache) for c in split["val"]] if identify and d.main else []
    R.log(f"pre-training preset {cfg.preset} ({', '.join(t for t in TERMS if use[t])}"
          f"{', prior' if use['prior'] else ', no prior'}"
          f"{', decoder without skips' if cfg.decom_skips == 'none' else ''}"
          f"{', same views for the persons of a step' if cfg.same_views else ''}) on {len(split['train'])} persons x {nm} modalities "
          f"({', '.join(spec.modalities)}), roi {roi}, F={cfg.feature_size}, {d.world} rank(s) on {d.device}, "
          f"{sum(p.numel() for p in params) / 1e6:.1f} M parameters", d)

    net.train()
    step = start
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not d.main, desc="pre-train", dynamic_ncols=True)
    timer = R.Timer()
    for batch in loader:
        wait = timer.lap()
        x = sampling.dequantise(batch["image"].to(d.device, non_blocking=True), batch["scale"])
        fg = batch["fg"].to(d.device, non_blocking=True)
        # All randomness of a step comes from (seed, step, person index in the global batch):
        # resume is exact and the split of the global batch over ranks does not matter.
        first = d.rank * x.shape[0]
        rngs = [np.random.default_rng([cfg.seed, step, first + j]) for j in range(x.shape[0])]
        gens = [torch.Generator(device=x.device).manual_seed(int(r.integers(2**62))) for r in rngs]
        order = np.random.default_rng([cfg.seed, step]).permutation(nm)  # same on every rank
        # --same-views: the generator of a person past the global batch turns every person
        turn = np.random.default_rng([cfg.seed, step, d.world * x.shape[0]]) if cfg.same_views else None
        persons = torch.as_tensor([index[c] for c in batch["id"]], device=d.device)
        optim.zero_grad(set_to_none=True)
        anchors, sums, diag = None, {t: 0.0 for t in TERMS if use[t]}, {}
        total = 0.0
        for i in order:
            with R.autocast(d, cfg.amp):
                terms, anchors, seen = modality_step(net, x, fg, int(i), rngs, gens, cfg, use, anchors, n_classes,
                                                    queue, persons, turn)
            loss = sum(weights[t] * v.float() for t, v in terms.items())
            loss.backward()  # frees this modality's graph
            total += loss.item() / nm
            for t, v in terms.items():
                sums[t] += v.item() / nm
            for k, v in seen.items():
                diag[k] = diag.get(k, 0.0) + v / nm
        _, diag = R.mean_over_ranks([0.0, diag], d)
        if (use["pers"] or use["var"] or use["cov"]) and not cfg.same_views:  # this step's persons: the next steps' others
            queue = remember(queue, global_batch(anchors["xh"], persons), cfg.pers_queue)
        total, sums, skipped, lr, norms = R.optimizer_step(net, params, optim, sched, guard, cfg.clip, d, total,
                                                           sums, watch=branch)
        step += 1
        if branch:
            diag["prior_change"] = float((net.prior.detach() - prior_init).norm() / prior_init.norm())
        if val_vols and (step % cfg.id_every == 0 or step == cfg.max_steps):
            diag.update(identification(net, val_vols, spec.modalities, roi, d.device))
        R.log_step(jlog, bar, step, total, sums, lr, wait, timer, skipped, {**norms, **diag})
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            R.save_state(out / "last.pt", net, optim, sched, step, cfg, d, arch=arch,
                         contract=data.contract(spec), modalities=list(spec.modalities), split=split,
                         kind="pretrain", prior_init=prior_init, pers_queue=queue)
        timer.lap()
    bar.close()
    if d.main:
        png = R.plot_log(out / "log.jsonl", out / "loss_curves.png", ["loss", *TERMS, "lr", *DIAGNOSTICS],
                         f"pre-training, preset {cfg.preset}")
        R.log(f"done: {step} steps; checkpoint {out / 'last.pt'}, log {out / 'log.jsonl'}, curves {png}"
              f"{f', {guard.total} non-finite steps skipped' if guard.total else ''}", d)
    R.cleanup_distributed()
    return out / "last.pt"


if __name__ == "__main__":
    main()
