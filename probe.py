"""Can the prior branch carry persons at all? A stage-1 checkpoint's encoder is frozen; a fresh
prior branch z' = T(Attn(z, O, O)) at the roi's bottleneck grid is fitted on the training
persons' z for one thing only, telling persons apart across modalities (a supervised contrastive
loss on its centred output), and is scored on held-out persons with the metrics of evaluate.py
--task identify: centred identification, the between-person fraction and its number of
directions. Beside it, the same fit for T alone (T's two convolutions on z, no attention) and z
itself unfitted. If the fitted z' identifies persons as well as T(z), the attention over O
passes persons when it is asked to and a collapse in pre-training comes from the losses; if it
stays below, the attention at this grid is the bottleneck.

    python probe.py --ckpt runs/pretrain/last.pt --data demo --out runs/probe
    python probe.py --ckpt runs/pretrain/last.pt --data demo --roi 96 --prior-heads 3 --out runs/probe-96

--roi other than the checkpoint's builds the same encoder at that roi (the Swin encoder is
convolutional in its input size); the probe's prior branch is always new, so its grid follows
the roi. Training crops: the central one and --positions - 1 others moved by up to --shift of
the roi along each axis, the same move for every person and modality of a position; held-out
persons are scored on the central crop, as evaluate.py --task identify does.
"""
import copy
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import inference
import metrics
import report
import runtime as R
from files import git_commit, staging, write_json
from model import PRIOR_BRANCH, PersonalizedSwinUNETR, build_model, load_mapped

GRID_MODULES = PRIOR_BRANCH + ("equ_head.", "proj_head.")  # parameters whose shapes follow the grid


@dataclass
class Config:
    ckpt: str = R.opt(None, "stage-1 checkpoint (train_pretrain.py's OUT/last.pt)", required=True)
    data: str = R.opt(None, "dataset folder, datalist JSON or 'demo'", required=True)
    out: str = R.opt(None, "output folder", required=True)
    roi: int = R.opt(0, "cubic roi of the crops, a multiple of 32 (0: the checkpoint's roi as it is)")
    prior_heads: int = R.opt(0, "heads of the fresh prior attention, dividing the grid's size (0: the checkpoint's)")
    prior_logits: str = R.opt("", "the fresh prior attention's logits (default: the checkpoint's)",
                              choices=("", "dot", "cosine"))
    untrained: bool = R.opt(False, "the checkpoint's encoder with its run's initial weights")
    positions: int = R.opt(8, "training crops per person and modality (the central one and others moved)")
    shift: float = R.opt(0.25, "largest move of a training crop, a fraction of the roi per axis")
    steps: int = R.opt(300, "optimizer steps of each fit (one training position a step)")
    lr: float = R.opt(1e-3, "Adam learning rate of the fits")
    tau: float = R.opt(0.1, "temperature of the contrastive loss")
    cache: str = R.opt("", "preprocessed-data cache folder (default: data.py's)")
    device: str = R.opt("auto", "auto | cuda | cpu | cuda:N")
    seed: int = R.opt(0, "seed of the training positions and of the fresh branch")


def person_contrast(feats, person, tau=0.1):
    """Supervised contrastive loss (Khosla et al. 2020, L_out) on feats (n, d) with person
    indices (n,): the vectors centred on their mean and L2-normalised; for each vector, minus the
    mean log-softmax (over every other vector, cosine / tau) of the vectors of the same person.
    Vectors without another of their person are left out; 0 when none has one."""
    f = feats.flatten(1).float()
    f = F.normalize(f - f.mean(0, keepdim=True), dim=-1)
    n = f.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    logp = (f @ f.T / tau).masked_fill(eye, -math.inf).log_softmax(1)
    pos = (person.view(-1, 1) == person.view(1, -1)) & ~eye
    has = pos.any(1)
    if not has.any():
        return feats.sum() * 0.0
    per = logp.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp_min(1)
    return -per[has].mean()


def fit(head, params, z, steps, lr=1e-3, tau=0.1, seed=0, log_every=25):
    """Fits head (z (n, C, *grid) -> (n, ...)) by Adam on `params` to person_contrast over each
    position's persons x modalities, z (K positions, P persons, M modalities, C, *grid), one
    position a step in a seeded random order. Returns the loss per log_every steps (means)."""
    k, p, m = z.shape[:3]
    person = torch.arange(p, device=z.device).repeat_interleave(m)
    opt = torch.optim.Adam(params, lr=lr)
    order = np.random.default_rng(seed).integers(0, k, steps)
    curve, run = [], []
    for step, i in enumerate(order, 1):
        loss = person_contrast(head(z[i].flatten(0, 1)), person, tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.append(loss.item())
        if step % log_every == 0 or step == steps:
            curve.append({"step": step, "loss": float(np.mean(run))})
            run = []
    return curve


def score(head, z):
    """metrics.representation_summary of head(z) over z (P persons, M modalities, C, *grid)."""
    with torch.no_grad():
        out = torch.stack([head(z[i]).flatten(1) for i in range(z.shape[0])])
    return metrics.representation_summary(out.float().cpu())


def encoder_at(cfg, dev):
    """The checkpoint's network with its encoder's weights (or its run's initial ones) at the
    probe's roi, a fresh network of that roi for the probe's branches (personalized, whatever
    the checkpoint's kind: the SwinUNETR baseline's z is probed the same way), and the meta."""
    net, meta = inference.open_checkpoint(inference.load_pretrained, cfg.ckpt, dev, cfg.untrained)
    arch = dict(meta["arch"], kind="personalized", roi=[cfg.roi] * 3 if cfg.roi else list(meta["roi"]), prior=True,
                prior_heads=cfg.prior_heads or meta["arch"]["prior_heads"],
                prior_logits=cfg.prior_logits or meta["arch"].get("prior_logits", "dot"))
    grid = math.prod(r // 32 for r in arch["roi"])
    if any(r % 32 for r in arch["roi"]) or grid % arch["prior_heads"]:
        raise SystemExit(f"--roi {arch['roi'][0]}, --prior-heads {arch['prior_heads']}: the roi must be a multiple "
                         f"of 32 and the heads must divide its bottleneck grid size {grid}")
    if isinstance(net, PersonalizedSwinUNETR) and list(arch["roi"]) != list(meta["roi"]):  # a plain one fits any roi
        enc = build_model(arch)
        try:
            load_mapped(enc, net.state_dict(), cfg.ckpt, skip=GRID_MODULES, log=lambda *_: None)
        except ValueError as e:
            raise SystemExit(" ".join(str(e).split())[:400]) from None
        net = enc.to(dev).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        fresh = build_model(arch).to(dev)
    return net, fresh, arch, meta


def encode_all(net, images, names, roi, offsets, dev):
    """z of every modality alone at every offset: (K offsets, P persons, M, C, *grid) float32."""
    out = []
    with torch.no_grad():
        for im in images:
            per = []
            for off in offsets:
                x = inference.central_crop(im, names, roi, dev, off)
                per.append(torch.cat([net.encode(inference.single(x, i))[0] for i in range(len(names))]))
            out.append(torch.stack(per))
    return torch.stack(out, 1).float()


def offsets_of(cfg, roi):
    rng = np.random.default_rng(cfg.seed)
    reach = [int(cfg.shift * r) for r in roi]
    return [(0, 0, 0)] + [tuple(int(rng.integers(-a, a + 1)) for a in reach) for _ in range(cfg.positions - 1)]


def main(argv=None):
    cfg = R.parse_config(Config, argv, __doc__.split("\n\n")[0])
    if cfg.positions < 1 or cfg.steps < 1 or not 0 <= cfg.shift < 1:
        raise SystemExit("--positions and --steps must be >= 1 and --shift in [0, 1)")
    torch.manual_seed(cfg.seed)
    dev = inference.device_of(cfg.device)
    net, fresh, arch, meta = encoder_at(cfg, dev)
    for p in net.parameters():
        p.requires_grad_(False)
    names, roi = meta["modalities"], tuple(arch["roi"])
    spec = inference.open_data(cfg.data, names, meta, "pre-training", cfg.ckpt).without_labels()
    cache = Path(cfg.cache) if cfg.cache else None
    cases = {s: inference.split_cases(spec, meta, s, cfg.ckpt) for s in ("train", "test")}
    if min(len(ids) for ids in cases.values()) < 2:
        raise SystemExit(f"{cfg.ckpt}: the probe needs at least 2 train and 2 test persons, the checkpoint's split has "
                         f"{len(cases['train'])} and {len(cases['test'])}")
    offsets = offsets_of(cfg, roi)
    z = {}
    for s, ids in cases.items():
        vols = (inference.open_case(spec, c, cache).image for c in tqdm(ids, desc=f"encode {s}", unit="person",
                                                                  dynamic_ncols=True))
        z[s] = encode_all(net, vols, names, roi, offsets if s == "train" else [(0, 0, 0)], dev)
    transfer = copy.deepcopy(fresh.transfer)
    heads = {"z": (lambda v: v, []),
             "T(z)": (transfer, list(transfer.parameters())),
             "z' = T(Attn(z, O, O))": (fresh.prior_branch, [fresh.prior, *fresh.prior_attn.parameters(),
                                                            *fresh.transfer.parameters()])}
    rows, curves = [], {}
    for name, (head, params) in heads.items():
        before = test = score(head, z["test"][0])
        if params:
            curves[name] = fit(head, params, z["train"], cfg.steps, cfg.lr, cfg.tau, cfg.seed)
            test = score(head, z["test"][0])
        train = score(head, z["train"][0])
        rows.append({"representation": name, "fitted": "yes" if params else "no",
                     "test ID centred": test["accuracy_centred"], "before fit": before["accuracy_centred"],
                     "train ID centred": train["accuracy_centred"], "between": test["between"],
                     "between dims": test["between_dims"],
                     "loss first": curves[name][0]["loss"] if params else float("nan"),
                     "loss last": curves[name][-1]["loss"] if params else float("nan")})
        print(f"{name}: test centred ID {before['accuracy_centred']:.3f} -> {test['accuracy_centred']:.3f}, "
              f"train {train['accuracy_centred']:.3f}", flush=True)
    info = {"seed": cfg.seed, "commit": git_commit(), "config": asdict(cfg), "arch": arch, "ckpt_step": meta["step"],
            "cases": cases, "offsets": offsets, "chance": {"test": 1 / len(cases["test"]), "train": 1 / len(cases["train"])}}
    with staging(Path(cfg.out)) as stage:
        report.write_table(rows, None, stage / "table_probe", meta=info)
        write_json(stage / "results.json", {"meta": info, "rows": rows, "curves": curves})
        text = (stage / "table_probe.md").read_text()
    print(f"\nprior-branch probe, grid {fresh.grid}, {len(cases['test'])} test persons (chance "
          f"{1 / len(cases['test']):.3f}), step {meta['step']}{' (untrained)' if cfg.untrained else ''}\n\n{text}")
    sys.stdout.flush()
    return {"out": Path(cfg.out), "rows": rows, "curves": curves}


if __name__ == "__main__":
    main()
