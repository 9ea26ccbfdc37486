"""Stage 2: downstream tuning (Algorithm 2 of the paper, as METHOD.md states it).

    python train_downstream.py --task seg --data demo --init ours:runs/pretrain/last.pt --out runs/seg
    python train_downstream.py --task transfer --data demo --init ours:runs/pretrain/last.pt --out runs/transfer
    python train_downstream.py --task transfer --data demo-petct --inputs pet --targets ct --init scratch
    python train_downstream.py --task seg --data demo --modalities t1,t2 --init ours:runs/pt-petct/last.pt --new-decoder
    torchrun --nproc_per_node=4 train_downstream.py --task seg --data /data/BraTS2021 --init ssl:model_swinvit.pt

One step, for each person of the batch and each available input modality i in random order:
repeat the modality on all |M| input channels, encode it (z, skips x^i), personalize it
(X_h^i' = Fuse(z, T(Attn(z, O, O))); X_h^i' = z for --arch swinunetr), L_inv against the
running anchor, decode Y^i = D(X_h^i', x^i) and add L_ori(Y^i, Y). Then the fused path: every
person draws a random non-empty subset S of the inputs; the means over S of X_h^i', of the
skips and of the inputs are decoded once and add L_ori. Inference from any subset S of the
modalities is that fused path (S of one modality is the per-modality path).
L_ori: Dice + weighted BCE on sigmoid regions (seg; BraTS TC, WT, ET; AutoPET lesion) or the
L_decom reconstruction loss against the target modalities (transfer). One optimizer step per
person-batch. The val split is scored with sliding windows every --val-every steps; OUT/best.pt
keeps the best weights (seg: mean Dice over the regions; transfer: strict PSNR from each single
input to the other targets). OUT/last.pt continues a run exactly (--resume auto).

Inference with the tuned network (load_tuned, predict_subsets, the fused path) is inference.py.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import layouts
import losses
import metrics
import model as M
import runtime as R
import sampling
from files import git_commit, save_checkpoint, write_json
from inference import encode, fuse, predict, predict_subsets, single
from model import build_model

TASKS = ("seg", "transfer")
ARCHS = ("full", "swinunetr")
TERMS = ("ori", "inv", "fused")
# D of METHOD.md: the convolutional blocks that read the skips, the up-sampling path and the head.
DECODER = ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.", "decoder5.", "decoder4.",
           "decoder3.", "decoder2.", "decoder1.", "out.")
STAGE1_HEADS = ("equ_head.", "proj_head.")  # F_equ and g: loaded, but not used (frozen) in stage 2
# Contract entries that differ on purpose when tuning on another domain with a new decoder (F.4).
DOMAIN_GAP = ("modalities", "normalisation", "spacing", "layout", "label_kind", "regions")


@dataclass
class Config(R.TrainConfig):
    out: str = R.opt("runs/downstream", "folder for checkpoints, log, validation results and figures")
    task: str = R.opt("seg", "seg (sigmoid regions: BraTS TC,WT,ET; AutoPET lesion) or transfer (modality synthesis)")
    init: str = R.opt("scratch", "scratch | ours:CKPT (stage-1 checkpoint) | ssl:PATH (Tang et al. model_swinvit.pt) | "
                                 "monai:PATH (a MONAI SwinUNETR state dict) | reference:PATH (the reference code's "
                                 "SSLHead checkpoint)")
    patch_embed: str = R.opt("tile", "--init ssl: adapt the 1-channel patch embedding by 'tile' or 'reinit'")
    merging: str = R.opt("auto", "patch-merging order: auto (legacy for --init ssl, whose public weights were trained "
                                 "with it; else the stage-1 checkpoint's; else monai), monai or legacy",
                         choices=("auto", "monai", "legacy"))
    arch: str = R.opt("full", "full (personalized bottleneck; the prior as the stage-1 checkpoint has it) or swinunetr")
    modalities: str = R.opt("", "the |M| channels, in order (default: the stage-1 checkpoint's, else all of the data)")
    inputs: str = R.opt("", "modalities available as inputs in training and validation (default: all of --modalities)")
    targets: str = R.opt("", "transfer: modalities to synthesise (default: all of --modalities)")
    new_decoder: bool = R.opt(False, "keep E, O, Attn, T, Fuse of --init ours, draw D anew (supplementary F.4: "
                                   "another domain with the same number of channels)")
    roi: str = R.opt("", "crop and window size, one side or D,H,W, multiples of 32 (default: the checkpoint's, else 96)")
    feature_size: int = R.opt(0, "Swin feature size F (default: the checkpoint's, else 48)")
    prior_heads: int = R.opt(0, "heads of the prior attention (default: the checkpoint's, else 3)")
    w_inv: float = R.opt(1.0, "weight of L_inv (0 for the baselines of Table 8)")
    fg_fraction: float = R.opt(0.5, "fraction of crops centred on a tumour / lesion voxel (the rest uniform)")
    w_fused: float = R.opt(1.0, "weight of L_ori of the fused random-subset path")
    head_prior: float = R.opt(0.01, "seg: probability a new output layer starts with (bias = logit p, the "
                                    "prior-probability init of RetinaNet; 0.5 = bias 0)")
    labelled: int = R.opt(0, "tune on N of the training persons only (the labelled few; drawn with --seed, the same "
                             "for every --init), 0 = all of them")
    val_every: int = R.opt(100, "score the val split every N steps and at the end (0: only at the end; -1: never, "
                                "no best.pt)")
    overlap: float = R.opt(0.5, "sliding-window overlap in validation")
    sw_batch_size: int = R.opt(4, "windows per forward in validation")


# ---- one step ------------------------------------------------------------------------------------


def ori_loss(task, y, x, batch, targets, w_fg):
    """L_ori: Dice + weighted BCE on the region channels, or L_decom against the targets."""
    if task == "seg":
        return losses.seg_loss(y, batch["regions"])
    return losses.decomposition_loss(y, x[:, targets], batch["fg"], w_fg)


def tuning_step(net, x, batch, cfg, inputs, targets, order, w, d, backward=True):
    """Algorithm 2 on one batch; with backward=True the gradients of every term are accumulated.

    x (B, |M|, *roi); inputs/targets: channel indices; order: the inputs in processing order;
    w (len(inputs), B): each person's fused subset. Each decoder graph is freed by its own
    backward(); the encoder graphs are kept until the fused path has used their outputs, then
    back-propagated once with the gradients collected there (the gradient of one big backward,
    at the memory of one decoder graph at a time)."""
    terms = {t: 0.0 for t in TERMS}
    feats, graphs, anchor, total = [], [], None, 0.0
    for i in order:
        u = single(x, inputs[i])
        with R.autocast(d, cfg.amp), torch.set_grad_enabled(backward):
            xh, skips = encode(net, u)
        leaves = [t.detach().requires_grad_(backward) for t in (xh, *skips)]
        graphs.append((xh, *skips))
        feats.append((leaves[0], leaves[1:], u))
        with R.autocast(d, cfg.amp), torch.set_grad_enabled(backward):
            l_inv = losses.invariance_loss(leaves[0], anchor)  # on X_h', zero for the first modality
            anchor = losses.update_anchor(anchor, leaves[0])
            l_ori = ori_loss(cfg.task, net.decode(leaves[0], leaves[1:], u), x, batch, targets, cfg.w_fg)
            loss = l_ori.float() + cfg.w_inv * l_inv.float()
        if backward:
            loss.backward()
        total += loss.item()
        terms["ori"] += l_ori.item() / len(order)
        terms["inv"] += l_inv.item() / max(1, len(order) - 1)
    with R.autocast(d, cfg.amp), torch.set_grad_enabled(backward):
        xh, skips, u = fuse(feats, w[order])
        l_fused = ori_loss(cfg.task, net.decode(xh, skips, u), x, batch, targets, cfg.w_fg).float()
    if backward:
        (cfg.w_fused * l_fused).backward()
        outs = [t for g in graphs for t in g]
        grads = [leaf.grad for f in feats for leaf in (f[0], *f[1])]
        torch.autograd.backward(outs, grads)
    terms["fused"] = l_fused.item()
    terms["loss"] = total + cfg.w_fused * terms["fused"]  # the objective: sum over modalities + fused path
    return terms


def step_randomness(seed, step, first, b, n_inputs):
    """The modality order of a step (same on every rank) and each person's fused subset
    (n_inputs, b) from (seed, step, index of the person in the global batch): resume is exact
    and the split of the global batch over ranks does not matter."""
    order = np.random.default_rng([seed, step]).permutation(n_inputs)
    codes = [int(np.random.default_rng([seed, step, first + j]).integers(1, 2 ** n_inputs)) for j in range(b)]
    w = torch.tensor([[(c >> i) & 1 for c in codes] for i in range(n_inputs)], dtype=torch.float32)
    return order, w


# ---- validation ------------------------------------------------------------------------------


def score_case(net, vol, meta, overlap, sw_batch_size, amp):
    """Validation numbers of one case. seg: Dice per region from all inputs and their mean, by
    the convention evaluate.py reports: the region masks made into a label map in the dataset's
    convention and scored by the regions of that map (which nests ET in TC in WT), empty masks
    under the same policy (BraTS: empty truth and prediction score 1; AutoPET: a true negative
    has no Dice). transfer:
    strict PSNR / NMSE / SSIM from each single input to every other target, their means, and the
    identity baseline (the z-scored source itself as the prediction)."""
    dev = next(net.parameters()).device
    image = torch.from_numpy(np.array(vol.image, dtype=np.float32)).to(dev)  # a copy: the cache is read-only
    names = meta["modalities"]
    if meta["task"] == "seg":
        logits = predict(net, image, meta["inputs"], meta, overlap=overlap, sw_batch_size=sw_batch_size, amp=amp)
        truth = torch.from_numpy(vol.regions).to(dev) > 0.5
        policy = "autopet" if meta["label_kind"] == "autopet" else "brats"
        regions, values = meta["regions"], vol.region_values
        label = data.regions_to_label((logits > 0).cpu().numpy(), values)
        masks = torch.from_numpy(data.label_to_regions(label, values)).to(dev) > 0.5
        row = metrics.region_metrics({r: masks[k] for k, r in enumerate(regions)},
                                     {r: truth[k] for k, r in enumerate(regions)}, policy)
        out = {f"dice_{r}": row[r] for r in regions}
        out["dice"] = metrics.nanmean(out.values())
        return out
    fg = torch.from_numpy(np.array(vol.fg, dtype=bool)).to(dev)
    wanted = [(s, t) for s in meta["inputs"] for t in meta["targets"] if s != t]
    wanted = wanted or [(s, t) for s in meta["inputs"] for t in meta["targets"]]  # reconstruction only
    sources = list(dict.fromkeys(s for s, _ in wanted))
    preds = predict_subsets(net, image, [[s] for s in sources], meta, overlap=overlap, sw_batch_size=sw_batch_size,
                            amp=amp)
    rows = []
    for src, pred in zip(sources, preds):
        tgts = [t for s, t in wanted if s == src]
        rows += metrics.transfer_case(vol.id, src, [pred[meta["targets"].index(t)] for t in tgts],
                                      [image[names.index(t)] for t in tgts], fg, tgts, "strict",
                                      identity=image[names.index(src)])
    out = {k: metrics.nanmean(r[k] for r in rows) for k in ("psnr", "nmse", "ssim")}
    out["psnr_identity"] = metrics.nanmean(r["identity_psnr"] for r in rows)
    out["pairs"] = {f"{r['source']}>{r['target']}": {m: r[m] for m in ("psnr", "nmse", "ssim")} for r in rows}
    return out


def summarise(cases):
    """Mean over cases of every scalar entry, NaN values left out."""
    keys = [k for k, v in next(iter(cases.values())).items() if isinstance(v, float)]
    return {k: metrics.nanmean(c[k] for c in cases.values()) for k in keys}


@torch.no_grad()
def validate(net, spec, ids, meta, d, overlap=0.5, sw_batch_size=4, amp=True, cache_dir=None):
    """Scores the cases `ids`: rank r takes every world-th of the sorted ids (no padding, so each
    case is scored exactly once), results are gathered by case id on every rank.
    Returns (per-case results sorted by id, means over the cases)."""
    ids = sorted(ids)
    was_training = net.training
    net.eval()
    mine = {}
    for cid in ids[d.rank::d.world]:
        mine[cid] = score_case(net, data.load_case(spec.case(cid), spec, cache_dir), meta, overlap, sw_batch_size, amp)
    net.train(was_training)
    cases = {}
    for part in R.all_gather_objects(mine, d):
        cases.update(part)
    if sorted(cases) != ids:
        raise RuntimeError(f"validation gathered cases {sorted(cases)}, expected {ids}")
    cases = {k: cases[k] for k in ids}
    return cases, summarise(cases)


# ---- initialisation --------------------------------------------------------------------------


def load_stage1(net, ck, task, targets, new_decoder=False, log=print):
    """Stage-1 weights (a train_pretrain checkpoint `ck`) into the tuning network `net`.

    Skipped on purpose, by name: the output layer for segmentation (new task; for transfer the
    rows of the target modalities are kept), the whole decoder D with new_decoder, and the
    bottleneck modules (O, Attn, T, Fuse, F_equ, g) a plain SwinUNETR does not have. Every other
    stage-1 tensor must load with its shape. Returns {"loaded", "skipped", "missing"} names
    (missing: tensors of net left at their random initialisation)."""
    sd, skipped = dict(ck["model"]), []
    names = list(ck["modalities"])
    for k in list(sd):
        drop = new_decoder and k.startswith(DECODER)
        drop |= not isinstance(net, M.PersonalizedSwinUNETR) and k.startswith(M.PRIOR_BRANCH + STAGE1_HEADS)
        drop |= k.startswith("out.") and (task == "seg" or not set(targets) <= set(names)
                                         or sd[k].shape[0] != len(names))
        if drop:
            skipped.append(k)
            del sd[k]
        elif k.startswith("out."):  # transfer: the decoder already predicts these modalities
            sd[k] = sd[k][[names.index(t) for t in targets]]
    personalized = isinstance(net, M.PersonalizedSwinUNETR)
    if personalized and net.use_prior and not any(k.startswith(M.PRIOR_BRANCH) for k in sd):
        log("[ours] the checkpoint has no prior: O, Attn, T and Fuse start from random weights")
    report = M.load_mapped(net, sd, "ours", log=log)
    log(f"[ours] loaded {len(report['matched'])} stage-1 tensors; skipped {len(skipped)}: {', '.join(skipped) or '-'}; "
        f"new (random): {', '.join(report['missing']) or '-'}")
    return {"loaded": report["matched"], "skipped": skipped, "missing": report["missing"]}


def init_head_prior(net, p):
    """Bias of a new segmentation output layer := logit(p). Tumour voxels are ~1% of a crop:
    starting every voxel at 50% spends the first hundreds of steps pushing the background
    down; starting near the prior makes the Dice term's gradient useful from step 1."""
    if not 0 < p < 1:
        raise SystemExit(f"--head-prior {p}: a probability strictly between 0 and 1")
    with torch.no_grad():
        net.out.conv.conv.bias.fill_(math.log(p / (1 - p)))


INITS = ("scratch", "ours", "ssl", "monai", "reference")


def parse_init(init):
    kind, _, path = init.partition(":")
    if kind not in INITS or (kind == "scratch") != (path == ""):
        raise SystemExit(f"--init {init}: use scratch, ours:CKPT (stage-1 checkpoint), ssl:PATH (model_swinvit.pt), "
                         "monai:PATH (MONAI SwinUNETR state dict) or reference:PATH (the reference code's checkpoint)")
    return kind, path


def load_foreign(net, kind, path, patch_embed, log):
    """--init ssl / monai / reference: the file's tensors by their own names (model.load_*), shapes
    checked. The output layer loads only where its shape fits (a new task gets a new one); a plain
    SwinUNETR skips the reference's bottleneck. Returns {"loaded", "skipped", "missing"} names
    (missing: tensors of net left at their random initialisation)."""
    try:
        if kind == "ssl":
            r = M.load_ssl_swinvit(net, path, patch_embed, log)
        elif kind == "monai":
            r = M.load_monai(net, path, skip=("out.",), log=log)
        else:
            skip = ("out.",) if isinstance(net, M.PersonalizedSwinUNETR) else ("out.",) + M.PRIOR_BRANCH
            r = M.load_reference(net, path, skip=skip, log=log)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--init {kind}:{path}: {' '.join(str(e).split())[:400]}") from None
    return {"loaded": r["matched"], "skipped": r["skipped"], "missing": r["missing"]}


def check_contract(source, path, spec, new_decoder):
    """Stops when the tuning data differ from the stage-1 data in what the model sees
    (modality order, normalisation, orientation, spacing). With new_decoder (another domain,
    F.4) only the channel count and the geometric conventions must agree."""
    saved, current = source["contract"], data.contract(spec)
    if new_decoder:
        if source["arch"]["in_channels"] != len(spec.modalities):
            raise SystemExit(f"{path}: pre-trained on {source['arch']['in_channels']} channels "
                             f"({','.join(source['modalities'])}); --new-decoder tuning needs as many, got "
                             f"{len(spec.modalities)} ({','.join(spec.modalities)})")
        gap = data.compare_contract(saved, current)
        saved = {k: v for k, v in saved.items() if k not in DOMAIN_GAP}
        current = {k: v for k, v in current.items() if k not in DOMAIN_GAP}
        if not data.compare_contract(saved, current):
            return gap  # expected differences, logged by the caller
    problems = data.compare_contract(saved, current)
    if problems:
        hint = ""
        if saved.get("modalities") != current.get("modalities") and set(saved["modalities"]) <= set(spec.modalities):
            hint = f" (pass --modalities {','.join(saved['modalities'])})"
        raise SystemExit(f"{path}: the tuning data differ from the pre-training data: {'; '.join(problems)}{hint}")
    return []


def names_of(flag, value, available, default):
    chosen = [s.strip() for s in value.split(",") if s.strip()] or list(default)
    unknown = [s for s in chosen if s not in available]
    if unknown or len(set(chosen)) != len(chosen):
        raise SystemExit(f"--{flag} {value}: choose distinct modalities among {','.join(available)}")
    return chosen


def architecture(cfg, source, n_channels, n_out, init_kind="scratch"):
    """The tuning network's architecture record (model.build_model builds it): sizes
    from the stage-1 checkpoint unless given, and checked against it."""
    s = source["arch"] if source else {}
    stage1_merging = s.get("merging", "monai")
    merging = cfg.merging if cfg.merging != "auto" else ("legacy" if init_kind == "ssl" else stage1_merging)
    if s and merging != stage1_merging:
        raise SystemExit(f"--merging {cfg.merging}: the stage-1 checkpoint was built with the {stage1_merging} order")
    personalized = cfg.arch == "full"
    prior = s.get("prior", True) if s.get("kind") == "personalized" else True
    fs = cfg.feature_size or s.get("feature_size", 48)
    heads = cfg.prior_heads or s.get("prior_heads", 3)
    roi = R.roi_tuple(cfg.roi or ",".join(map(str, s.get("roi", [96]))))
    if s:
        fixed = {"feature-size": (fs, s["feature_size"])}
        if personalized and s.get("kind") == "personalized":  # O and the heads are shaped like one bottleneck
            fixed.update({"roi": (",".join(map(str, roi)), ",".join(map(str, s["roi"]))),
                          "prior-heads": (heads, s["prior_heads"])})
        for flag, (want, have) in fixed.items():
            if want != have:
                raise SystemExit(f"--{flag} {want}: the stage-1 checkpoint was built with {have}")
    return {"kind": "personalized" if personalized else "swinunetr", "in_channels": n_channels,
            "out_channels": n_out, "feature_size": fs, "roi": list(roi), "prior": prior, "prior_heads": heads,
            "prior_logits": s.get("prior_logits", "dot"), "prior_fuse": s.get("prior_fuse", "concat"),
            "phi": s.get("phi", "rot90"), "merging": merging, "attn_backend": cfg.attn_backend,
            "checkpointing": cfg.checkpointing}


def labelled_persons(train, n, seed):
    """The n persons of `train` a low-label run tunes on (all of them for n = 0), drawn with the
    seed alone, so that runs of one seed with any --init see the same persons."""
    if n < 0 or n > len(train):
        raise SystemExit(f"--labelled {n}: choose 0 (all) to {len(train)}, the number of training persons")
    if n == 0:
        return list(train)
    pick = np.random.default_rng([seed, 4177]).choice(len(train), n, replace=False)  # 4177: its own stream
    return [train[i] for i in sorted(pick)]


def tuning_split(spec, cfg, source, out, d):
    """The stage-1 split when tuning on the same cases (its val and test persons stay unseen
    by both stages), else a new one; kept in OUT/split.json, which a rerun reuses."""
    path = out / "split.json"
    if d.main and not path.exists() and source is not None and "split" in source:
        s = source["split"]
        if sorted(s["train"] + s["val"] + s["test"]) == sorted(c.id for c in spec.cases):
            write_json(path, {"dataset": str(spec.root), "source": "stage-1 checkpoint", **s})
    split = data.make_split(spec, cfg.seed, cfg.val_fraction, cfg.test_fraction, path if d.main else None)
    R.barrier(d)
    if not d.main:
        split = data.make_split(spec, cfg.seed, cfg.val_fraction, cfg.test_fraction, path)
    return split


# ---- the loop --------------------------------------------------------------------------------


def main(argv=None):
    cfg = R.parse_config(Config, argv, __doc__.split("\n\n")[0])
    if cfg.task not in TASKS or cfg.arch not in ARCHS:
        raise SystemExit(f"--task {cfg.task} --arch {cfg.arch}: choose the task among {TASKS}, the arch among {ARCHS}")
    init, init_path = parse_init(cfg.init)
    if cfg.new_decoder and init != "ours":
        raise SystemExit("--new-decoder needs --init ours:CKPT (it keeps the stage-1 encoder and bottleneck)")
    d = R.setup_distributed(cfg.device)
    R.seed_everything(cfg.seed)  # same initial weights on every rank (also broadcast below)
    out = Path(cfg.out)

    source = R.load_checkpoint(init_path) if init == "ours" else None
    if source is not None and source.get("kind") != "pretrain":
        raise SystemExit(f"{init_path}: not a stage-1 checkpoint of train_pretrain.py (kind {source.get('kind')!r})")
    default = source["modalities"] if source is not None and not cfg.new_decoder else None
    spec = layouts.resolve(cfg.data, [s for s in cfg.modalities.split(",") if s] or default, cfg.labels or None)
    gap = check_contract(source, init_path, spec, cfg.new_decoder) if source is not None else []
    names = list(spec.modalities)
    inputs = names_of("inputs", cfg.inputs, names, names)
    if cfg.task == "seg":
        if not spec.regions or spec.label_kind is None:
            raise SystemExit(f"{spec.root}: --task seg needs labelled cases (layout {spec.layout} has no labels)")
        targets, outputs = [], list(spec.regions)
    else:
        targets = names_of("targets", cfg.targets, names, names)
        outputs = targets
    arch = architecture(cfg, source, len(names), len(outputs), init)
    split = tuning_split(spec, cfg, source, out, d)
    train_ids = labelled_persons(split["train"], cfg.labelled, cfg.seed)
    roi = tuple(arch["roi"])
    task = {"task": cfg.task, "modalities": names, "inputs": inputs, "targets": targets,
            "regions": list(spec.regions) if cfg.task == "seg" else [], "label_kind": spec.label_kind,
            "region_values": ({k: None if v is None else [int(x) for x in v] for k, v in spec.regions.items()}
                              if cfg.task == "seg" else {}),
            "roi": list(roi), "init": cfg.init, "new_decoder": cfg.new_decoder, "persons": train_ids}

    net = build_model(arch).to(d.device)
    log = (lambda s: R.log(s, d))
    if gap:
        log(f"[ours] tuning on another domain with a new decoder (F.4): {'; '.join(gap)}")
    if init == "ours":
        report = load_stage1(net, source, cfg.task, targets, cfg.new_decoder, log)
    elif init != "scratch":
        report = load_foreign(net, init, init_path, cfg.patch_embed, log)
    else:
        report = {"loaded": [], "skipped": [], "missing": list(net.state_dict())}
    if cfg.task == "seg" and "out.conv.conv.bias" in report["missing"]:
        init_head_prior(net, cfg.head_prior)
    if d.main:
        write_json(out / "init.json", {"init": cfg.init, **report})
    if isinstance(net, M.PersonalizedSwinUNETR):
        for head in (net.equ_head, net.proj_head):  # stage-1 objectives only
            head.requires_grad_(False)
    R.broadcast_parameters(net, d)
    params, optim = R.make_optimizer(net, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, R.lr_lambda(cfg.warmup, cfg.max_steps, cfg.cosine))

    start, best = 0, -math.inf
    ck_path = R.resume_path(out, cfg.resume)
    if ck_path is not None:
        ck = R.restore_state(ck_path, net, optim, sched, d)
        same = ("task", "init", "arch", "seed", "new_decoder", "labelled")
        made_with = {"labelled": 0, **ck["config"]}  # checkpoints from before --labelled tuned on everyone
        if ck.get("kind") != "downstream" or any(made_with.get(k) != getattr(cfg, k) for k in same) \
                or ck["task"]["modalities"] != names or ck["task"]["inputs"] != inputs \
                or ck["task"]["targets"] != targets or not M.same_network(ck["arch"], arch):
            made = ", ".join(f"{k}={made_with.get(k)}" for k in same)
            raise SystemExit(f"{ck_path}: made with another task, init, architecture, seed or modalities "
                             f"({made}; network {ck['arch']}); use another --out")
        start, best = ck["step"], ck["best"]
        log(f"resumed from {ck_path} at step {start}")
    cache = cfg.cache or None
    loader = R.train_loader(spec, train_ids, roi, cfg.batch_size, cfg.max_steps, start, cfg.seed, d,
                            cfg.workers, cfg.fg_fraction, cache)
    jlog = R.JsonlLog(out / "log.jsonl", d.main, resume_step=start if ck_path else None)
    guard = R.NonFiniteGuard(cfg.max_nonfinite, d)
    main_metric = "dice" if cfg.task == "seg" else "psnr"
    commit = git_commit()  # recorded in best.pt and last.pt
    input_idx, target_idx = [names.index(m) for m in inputs], [names.index(m) for m in targets]
    persons = (f"{len(train_ids)} labelled of the {len(split['train'])} training persons" if cfg.labelled
               else f"{len(train_ids)} persons")
    log(f"tuning {cfg.task} ({', '.join(inputs)} -> {', '.join(outputs)}) from {cfg.init}, arch {cfg.arch}"
        f"{' (no prior)' if cfg.arch == 'full' and not arch['prior'] else ''} on {persons}, "
        f"val {len(split['val'])}, roi {roi}, F={arch['feature_size']}, {d.world} rank(s) on {d.device}, "
        f"{sum(p.numel() for p in params) / 1e6:.1f} M trained parameters")

    def validate_and_keep_best(step):
        nonlocal best
        if not split["val"] or cfg.val_every < 0:
            return {}
        cases, summary = validate(net, spec, split["val"], task, d, cfg.overlap, cfg.sw_batch_size, cfg.amp, cache)
        score = summary[main_metric] if not math.isnan(summary[main_metric]) else -math.inf
        improved = score > best
        if improved:
            best = score
        if d.main:
            write_json(out / "val.json", {"step": step, "summary": summary, "cases": cases})
            if improved:
                save_checkpoint(out / "best.pt", {
                    "model": net.state_dict(), "step": step, "arch": arch, "task": task,
                    "contract": data.contract(spec), "modalities": names, "split": split, "kind": "downstream",
                    "config": asdict(cfg), "val": summary, "commit": commit})
        R.barrier(d)
        jlog.write(step=step, **{f"val_{k}": v for k, v in summary.items()}, best=improved)
        log(f"step {step}: val {', '.join(f'{k} {v:.4f}' for k, v in summary.items())}{' (best)' if improved else ''}")
        return summary

    def save_last(step, summary):
        R.save_state(out / "last.pt", net, optim, sched, step, cfg, d, arch=arch, task=task,
                     contract=data.contract(spec), modalities=names, split=split, kind="downstream", best=best,
                     val=summary, commit=commit)

    net.train()
    step, summary = start, {}
    if start >= cfg.max_steps:  # nothing left to train: score the weights as they are
        summary = validate_and_keep_best(step)
        if summary or ck_path is None:  # a finished run stays untouched (evaluations newer than it are reused)
            save_last(step, summary)
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not d.main, desc=f"tune {cfg.task}", dynamic_ncols=True)
    timer = R.Timer()
    for batch in loader:
        wait = timer.lap()
        batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        x = batch["image"] = sampling.dequantise(batch["image"], batch["scale"])
        order, w = step_randomness(cfg.seed, step, d.rank * x.shape[0], x.shape[0], len(inputs))
        optim.zero_grad(set_to_none=True)
        terms = tuning_step(net, x, batch, cfg, input_idx, target_idx, order, w.to(d.device), d)
        loss = terms.pop("loss")
        loss, terms, skipped, lr, norms = R.optimizer_step(net, params, optim, sched, guard, cfg.clip, d, loss, terms)
        step += 1
        R.log_step(jlog, bar, step, loss, terms, lr, wait, timer, skipped, norms)
        if step == cfg.max_steps or (cfg.val_every > 0 and step % cfg.val_every == 0):
            summary = validate_and_keep_best(step)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save_last(step, summary)
        timer.lap()
    bar.close()
    if d.main:
        png = R.plot_log(out / "log.jsonl", out / "loss_curves.png", ["loss", *TERMS, f"val_{main_metric}", "lr"],
                         f"tuning {cfg.task} from {cfg.init}")
        kept = f"best val {main_metric} {best:.4f}; checkpoints {out / 'last.pt'}, {out / 'best.pt'}" \
            if math.isfinite(best) else f"no validation; checkpoint {out / 'last.pt'}"
        R.log(f"done: {step} steps; {kept}; log {out / 'log.jsonl'}, curves {png}"
              f"{f', {guard.total} non-finite steps skipped' if guard.total else ''}", d)
    R.cleanup_distributed()
    return {"last": out / "last.pt", "best": out / "best.pt" if math.isfinite(best) else None, "init": report,
            "val": summary, "step": step}


if __name__ == "__main__":
    main()
