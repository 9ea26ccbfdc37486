"""Evaluation: a tuned checkpoint on held-out persons -> the paper's tables, per-case results,
NIfTI predictions on the input's grid and figures (METHOD.md, "Evaluation protocols").

    python evaluate.py --ckpt runs/seg/best.pt --data demo --task seg --out runs/eval-seg
    python evaluate.py --ckpt runs/transfer/best.pt --data demo --task transfer --out runs/eval-transfer \
        --protocol reference,strict,percentile

transfer: every single input modality -> every target, scored on the original grid under each
protocol, beside the identity baseline (the normalised source itself as the prediction).
seg: every non-empty subset of the inputs (or all of them together, --subsets given); the region
masks are made into a label map in the dataset's convention, restored to the original grid and
scored from that map, as a challenge scores a submitted file.
identify: a stage-1 checkpoint (train_pretrain.py) and its held-out persons: is the nearest X_h'
(cosine) from another modality the same person's? Accuracy per modality pair against chance,
same- vs other-person cosine, the PCA of Figure 9 (--untrained: the run's initial weights).

    python evaluate.py --ckpt runs/pretrain/last.pt --data demo --task identify --out runs/identify

The metrics are metrics.py, inference (sliding windows, the fused path) inference.py, tables and
figures report.py; this file is the command.
"""
import itertools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import inference
import metrics
import report
import runtime as R
from files import git_commit, staging, write_json

USAGE = """python evaluate.py --ckpt RUN/best.pt --data PATH|demo|demo-petct --task transfer|seg|identify --out DIR
       [--split test|val|train|all] [--overlap 0.5] [--sw-batch-size 4] [--protocol reference,strict[,percentile]]
       [--policy brats|monai|autopet] [--subsets all|given] [--save-nifti | --no-save-nifti] [--figures N]
       [--hd95] [--untrained] [--modalities a,b] [--cache DIR] [--device auto] [--seed 0]"""

OUTPUTS = """Outputs under DIR: table10_transfer_<protocol> and table9_transfer_<protocol> (transfer) or
table11_missing_modality, table_lesionwise (lesion-wise Dice / HD95 / F1 by the BraTS 2024-2025
rules) and, for AutoPET, table8_autopet (seg), each as .md, .csv and .json;
results.json (per-case numbers, summaries, protocol, policy, seed, commit, configuration);
nifti/<case>/ (predictions on the input's grid, affine and header: transfer outputs in the
data layer's normalised units, segmentations as label maps in the dataset's convention);
figures/ (the first N cases, and the PCA of X_h' of every evaluated person; none with
--figures 0). identify: table_identification and table_mechanism (variance decomposition and raw / centred
identification of z, z' and X_h'; .md, .csv, .json), results.json, figures/embedding.png. Everything is
written in a hidden folder beside DIR and moved into DIR only when the whole run succeeded."""


@dataclass
class Config:
    ckpt: str = R.opt(None, "tuned checkpoint of train_downstream.py (OUT/best.pt or last.pt); identify: "
                            "train_pretrain.py's OUT/last.pt", required=True)
    data: str = R.opt(None, "dataset folder, datalist JSON, 'demo' or 'demo-petct'", required=True)
    task: str = R.opt(None, "the checkpoint's task (checked), or identify (a stage-1 checkpoint)",
                      choices=("transfer", "seg", "identify"))
    out: str = R.opt(None, "output folder", required=True)
    split: str = R.opt("test", "cases: the checkpoint's test, val or train split, or every case of --data "
                               "(identify --split train: the persons pre-training saw)",
                       choices=("test", "val", "train", "all"))
    overlap: float = R.opt(0.5, "sliding-window overlap (the reference used 0.75)")
    sw_batch_size: int = R.opt(4, "windows per forward")
    protocol: str = R.opt("reference,strict", "transfer protocols: reference, strict, percentile (metrics.transfer_metrics)")
    policy: str = R.opt(None, "empty-mask policy of Dice/HD95 (default: autopet for AutoPET labels, else brats)",
                        choices=sorted(metrics.EMPTY_POLICIES))
    subsets: str = R.opt("all", "seg: every non-empty subset of the input modalities, or only all of them together",
                         choices=("all", "given"))
    save_nifti: bool = R.opt(True, "write predictions as NIfTI on the input's grid")
    figures: int = R.opt(2, "PNG figures for the first N cases (0: no figures)")
    hd95: bool = R.opt(False, "seg: also HD95 per region (results.json)")
    untrained: bool = R.opt(False, "identify: the checkpoint's network with its run's initial weights")
    modalities: str = R.opt("", "the data's channels, in order (default: the checkpoint's)")
    cache: str = R.opt("", "preprocessed-data cache folder of --task identify (default: data.py's); "
                              "transfer and seg score against the source files")
    device: str = R.opt("auto", "auto | cuda | cpu | cuda:N")
    seed: int = R.opt(0, "recorded with the results (inference is deterministic)")

    @property
    def protocols(self):
        return [p.strip() for p in self.protocol.split(",") if p.strip()]


def parse_args(argv=None):
    """The command line as a checked Config."""
    cfg = R.parse_config(Config, argv, __doc__.split("\n\n")[0], USAGE[len("python "):], OUTPUTS)
    prots = cfg.protocols
    if not prots or any(p not in metrics.PROTOCOLS for p in prots) or len(set(prots)) != len(prots):
        raise SystemExit(f"--protocol {','.join(prots)}: choose distinct protocols among {', '.join(metrics.PROTOCOLS)}")
    if not 0 <= cfg.overlap < 1 or cfg.sw_batch_size < 1 or cfg.figures < 0:
        raise SystemExit("--overlap must be in [0, 1), --sw-batch-size >= 1 and --figures >= 0")
    return cfg


def options(cfg):
    """The configuration as results.json records it (the protocols as a list)."""
    return {**asdict(cfg), "protocol": cfg.protocols}


def input_subsets(inputs, which):
    """Every non-empty subset of the inputs, smallest first (15 for 4, 3 for 2), or the inputs."""
    if which == "given":
        return [list(inputs)]
    return [list(s) for k in range(1, len(inputs) + 1) for s in itertools.combinations(inputs, k)]


def _to(x, dev):
    return torch.from_numpy(np.ascontiguousarray(x)).to(dev)


def _transfer_case(net, vol, meta, cfg, dev, stage, figures):
    """Every single source -> every target of one case: rows of metrics.transfer_case per
    protocol with the identity baseline (scored on the original grid), NIfTI per source and
    target, one figure per source."""
    names, sources, targets, rec = meta["modalities"], meta["inputs"], meta["targets"], vol.record
    image = torch.from_numpy(np.array(vol.image, dtype=np.float32)).to(dev)  # a float32 copy of the case
    preds = inference.predict_subsets(net, image, [[s] for s in sources], meta, overlap=cfg.overlap,
                                      sw_batch_size=cfg.sw_batch_size, device=dev)
    on_source = inference.to_source_grid(vol.image, rec, names)
    truths = [_to(on_source[names.index(t)], dev) for t in targets]
    fg = _to(data.restore(np.asarray(vol.fg, dtype=bool), rec), dev)
    tumour = None if vol.label is None else _to(data.restore(np.asarray(vol.label) > 0, rec), dev)
    rows = []
    for s, pred in zip(sources, preds):
        restored = inference.to_source_grid(pred, rec, targets)
        if cfg.save_nifti:
            for p, t in zip(restored, targets):
                data.write_nifti(p, rec, stage / "nifti" / vol.id / f"{vol.id}_{s}_to_{t}.nii.gz", grid="original")
        rows += metrics.transfer_case(vol.id, s, [_to(p, dev) for p in restored], truths, fg, targets, cfg.protocols,
                                      tumour, identity=_to(on_source[names.index(s)], dev))
        if figures:
            report.figure_transfer(stage / "figures" / f"{vol.id}_from_{s}.png", vol.image[names.index(s)],
                                   pred.cpu().numpy(), [vol.image[names.index(t)] for t in targets], targets, s)
    return rows


def _seg_case(net, vol, meta, regions, cfg, dev, stage, figures):
    """Every subset of the inputs on one case: region masks (logits > 0) made into a label map
    in the dataset's convention, restored to the original grid and scored there by the regions
    of that map (what a challenge scores from a submitted file, so the numbers can be
    recomputed from the NIfTI output; where predicted regions are not nested this differs from
    scoring the channels): Dice (and HD95) per region, plus the AutoPET case metrics. The label
    map of all inputs together is written as NIfTI and drawn."""
    if vol.label is None:
        raise SystemExit(f"{vol.record['source']}: case {vol.id} has no label file; --task seg needs labels")
    rec, names = vol.record, list(regions)
    image = torch.from_numpy(np.array(vol.image, dtype=np.float32)).to(dev)
    subsets = input_subsets(meta["inputs"], cfg.subsets)
    logits = inference.predict_subsets(net, image, subsets, meta, overlap=cfg.overlap,
                                       sw_batch_size=cfg.sw_batch_size, device=dev)
    truth = _to(data.label_to_regions(data.restore(np.asarray(vol.label), rec), regions) > 0.5, dev)
    spacing = data.source_spacing(rec)
    rows = []
    for sub, lg in zip(subsets, logits):
        pre = data.regions_to_label((lg > 0).cpu().numpy(), regions)  # (D, H, W) on the preprocessed grid
        label = data.restore(pre, rec)  # (X, Y, Z) on the original grid
        masks = _to(data.label_to_regions(label, regions) > 0.5, dev)
        row = metrics.seg_case(vol.id, dict(zip(names, masks)), dict(zip(names, truth)), sub, cfg.policy, spacing,
                               cfg.hd95)  # BraTS regions come back as WT, TC, ET
        if meta["label_kind"] == "autopet":
            row["autopet"] = metrics.autopet_case_metrics(masks[0], truth[0], spacing)
        row["lesionwise"] = {r: metrics.lesion_metrics(m, t, spacing) for r, m, t in zip(names, masks, truth)}
        rows.append(row)
        if sub == list(meta["inputs"]):
            if cfg.save_nifti:
                data.write_nifti(label, rec, stage / "nifti" / vol.id / f"{vol.id}_seg.nii.gz", grid="original")
            if figures:
                show = next((m for m in ("flair", "t1ce", "pet") if m in meta["inputs"]), meta["inputs"][0])
                report.figure_segmentation(stage / "figures" / f"{vol.id}_seg.png",
                                           vol.image[meta["modalities"].index(show)], pre, np.asarray(vol.label))
    return rows


def _transfer_tables(rows, meta, cfg, stage, info):
    """Tables 10 and 9 per protocol; returns [(title, path stem)] and the per-pair summary."""
    written, summary = [], {}
    pairs = [(s, t) for s, t in (("t1", "t2"), ("t2", "flair")) if s in meta["inputs"] and t in meta["targets"]]
    for protocol in cfg.protocols:
        sel = [r for r in rows if r["protocol"] == protocol]
        tmeta = dict(info, protocol=protocol)
        stem = stage / f"table10_transfer_{protocol}"
        report.write_table(report.transfer_matrix_table(sel), None, stem, tmeta)
        written.append((f"Table 10 ({protocol} protocol): source x target, mean and std over cases", stem))
        if pairs:
            stem = stage / f"table9_transfer_{protocol}"
            report.write_table(report.transfer_summary_table(sel, pairs), None, stem, tmeta)
            shown = ", ".join(f"{report.display_name(s)}->{report.display_name(t)}" for s, t in pairs)
            written.append((f"Table 9 ({protocol} protocol): {shown}", stem))
        keys = [k for k, v in sel[0].items() if isinstance(v, float) and k != "data_range"]
        summary[protocol] = {f"{s}>{t}": {k: metrics.nanmean(r[k] for r in sel if (r["source"], r["target"]) == (s, t))
                                          for k in keys}
                             for s, t in dict.fromkeys((r["source"], r["target"]) for r in sel)}
    return written, summary


def _seg_tables(rows, meta, regions, cfg, stage, info):
    """Table 11 (and Table 8 for AutoPET); returns [(title, path stem)] and the per-subset summary."""
    names = list(regions)
    brats = sorted(n.upper() for n in names) == sorted(metrics.REGIONS)
    stem = stage / "table11_missing_modality"
    table = report.missing_modality_table(rows, meta["inputs"], metrics.REGIONS if brats else tuple(names))
    report.write_table(table, None, stem, info)
    n_empty = table[-1]["empty truth"]
    written = [(f"Table 11: Dice (%) per subset of the inputs, empty-mask policy {cfg.policy}, "
                f"{n_empty} (case, subset, region) triples with an empty truth", stem)]
    summary, lesion = {}, {}
    for sub in dict.fromkeys(tuple(r["subset"]) for r in rows):
        sel = [r for r in rows if tuple(r["subset"]) == sub]
        key = "+".join(sub)
        if brats:
            summary[key] = metrics.brats_summary(sel)
        else:
            summary[key] = {n: metrics.nanmean(r[n] for r in sel) for n in names}
        if meta["label_kind"] == "autopet":
            summary[key]["autopet"] = metrics.autopet_summary([r["autopet"] for r in sel])
        lesion[sub] = summary[key]["lesionwise"] = metrics.lesion_summary([r["lesionwise"] for r in sel])
    stem = stage / "table_lesionwise"
    report.write_table(report.lesion_table(lesion, [r.lower() for r in metrics.REGIONS] if brats else names),
                       None, stem, info)
    written.append((f"Lesion-wise (BraTS 2024-2025 rules): Dice (%), HD95 (mm; none matched: "
                    f"{metrics.HD_PENALTY:g}) and detection F1 (%) per subset of the inputs", stem))
    if meta["label_kind"] == "autopet":
        ap_rows = [{**r["autopet"], "method": "+".join(report.display_name(m) for m in r["subset"])} for r in rows]
        stem = stage / "table8_autopet"
        report.write_table(report.autopet_table(ap_rows), None, stem, dict(info, policy="autopet"))
        written.append(("Table 8: AutoPET, one row per subset of the inputs", stem))
    return written, summary


def identify(cfg):
    """--task identify: person identification from X_h' of a stage-1 checkpoint on its held-out
    persons (metrics.person_identification), a table, results.json and the PCA figure."""
    dev = inference.device_of(cfg.device)
    net, meta = inference.open_checkpoint(inference.load_pretrained, cfg.ckpt, dev, cfg.untrained)
    names = meta["modalities"]
    spec = inference.open_data(cfg.data, names, meta, "pre-training", cfg.ckpt).without_labels()
    ids = inference.split_cases(spec, meta, cfg.split, cfg.ckpt)
    if len(ids) < 2 or len(names) < 2:
        raise SystemExit(f"--task identify needs at least 2 persons and 2 modalities: {len(ids)} {cfg.split} "
                         f"person(s), modalities {','.join(names)}")
    cache = Path(cfg.cache) if cfg.cache else None
    images = (inference.open_case(spec, c, cache).image for c in tqdm(ids, desc="identify", unit="person", dynamic_ncols=True))
    tables = inference.representation_tables(net, images, names, tuple(meta["roi"]), dev)
    feats = tables["X_h'"]  # (persons, modalities, d)
    result = metrics.person_identification(feats, [report.display_name(m) for m in names])
    result["mechanism"] = {k: metrics.representation_summary(v) for k, v in tables.items() if k != "attention"}
    if "attention" in tables:
        result["attention_entropy_ratio"] = float(tables["attention"].mean())
    config = {**options(cfg), "ckpt_step": meta["step"], "preset": meta["preset"], "arch": meta["arch"],
              "data_root": str(spec.root), "device": str(dev)}
    info = {"seed": cfg.seed, "commit": git_commit(), "config": config, "split": cfg.split, "cases": ids}
    rows = report.identification_table(result)
    with staging(Path(cfg.out)) as stage:
        report.write_table(rows, None, stage / "table_identification", meta=info)
        report.write_table(report.mechanism_table(result), None, stage / "table_mechanism", meta=info)
        if cfg.figures:
            report.figure_embedding(stage / "figures" / "embedding.png", feats.flatten(0, 1),
                                    [report.display_name(m) for _ in ids for m in names], [c for c in ids for _ in names])
        write_json(stage / "results.json", {"meta": info, "summary": result})
        text = (stage / "table_identification.md").read_text() + "\n" + (stage / "table_mechanism.md").read_text()
    print(f"\nperson identification from X_h' ({len(ids)} {cfg.split} persons, step {meta['step']})\n\n{text}"
          f"\nmean accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f}); cosine same person "
          f"{result['cos_same']:.3f}, other persons {result['cos_other']:.3f}")
    sys.stdout.flush()
    return {"out": Path(cfg.out), "summary": result}


def main(argv=None):
    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)
    if cfg.task == "identify":
        return identify(cfg)
    dev = inference.device_of(cfg.device)
    net, meta = inference.open_checkpoint(inference.load_tuned, cfg.ckpt, dev)
    task = cfg.task or meta["task"]
    if task != meta["task"]:
        raise SystemExit(f"--task {task}: {cfg.ckpt} was tuned for {meta['task']}")
    if cfg.policy is None:
        cfg.policy = "autopet" if meta["label_kind"] == "autopet" else "brats"
    want = [m for m in cfg.modalities.split(",") if m.strip()] or meta["modalities"]
    spec = inference.open_data(cfg.data, want, meta, "tuning", cfg.ckpt)
    regions = dict(spec.regions)
    if task == "seg" and list(regions) != list(meta["regions"]):
        raise SystemExit(f"{spec.root}: the data's regions {list(regions)} differ from the checkpoint's "
                         f"{list(meta['regions'])}")
    ids = inference.split_cases(spec, meta, cfg.split, cfg.ckpt)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out}: exists and is not a folder")
    config = options(cfg)
    config.update(ckpt_step=meta["step"], arch=meta["arch"], modalities=meta["modalities"], inputs=meta["inputs"],
                  targets=meta["targets"], regions=meta["regions"], roi=meta["roi"], init=meta.get("init"),
                  data_root=str(spec.root), layout=spec.layout, device=str(dev))
    info = {"policy": cfg.policy if task == "seg" else None, "protocol": cfg.protocols if task == "transfer" else None,
            "seed": cfg.seed, "commit": git_commit(), "config": config, "split": cfg.split, "cases": ids}

    with staging(out) as stage:
        rows, feats, who, which = [], [], [], []
        for n, cid in enumerate(tqdm(ids, desc=f"evaluate {task}", unit="case", dynamic_ncols=True)):
            vol = inference.open_case(spec, cid, None, exact=True)
            figures = n < cfg.figures
            try:
                if task == "transfer":
                    rows += _transfer_case(net, vol, meta, cfg, dev, stage, figures)
                else:
                    rows += _seg_case(net, vol, meta, regions, cfg, dev, stage, figures)
            except ValueError as e:
                raise SystemExit(f"case {cid} ({vol.record['source']}): {' '.join(str(e).split())}") from None
            if cfg.figures:
                for m, f in zip(meta["inputs"], inference.embed(net, vol, meta, dev)):
                    feats.append(f)
                    who.append(cid)
                    which.append(report.display_name(m))
        if task == "transfer":
            written, summary = _transfer_tables(rows, meta, cfg, stage, info)
        else:
            written, summary = _seg_tables(rows, meta, regions, cfg, stage, info)
        if len(feats) >= 2:
            report.figure_embedding(stage / "figures" / "embedding.png", torch.stack(feats), which, who)
        per_case = {cid: [{k: v for k, v in r.items() if k != "case"} for r in rows if r["case"] == cid] for cid in ids}
        write_json(stage / "results.json", {"meta": info, "summary": summary, "cases": per_case})
        texts = [(title, Path(str(stem) + ".md").read_text()) for title, stem in written]
    for title, text in texts:
        print(f"\n{title}\n\n{text}", end="")
    sys.stdout.flush()
    personalized = hasattr(net, "personalize")
    print(f"\nevaluated {len(ids)} {cfg.split} case(s) on {dev}: tables, results.json"
          f"{', nifti/' if cfg.save_nifti else ''}{', figures/' if cfg.figures else ''} in {out}"
          f"{'' if personalized or not cfg.figures else ' (no embedding figure: the network has no personalization)'}",
          file=sys.stderr)
    return {"out": out, "tables": {stem.name: out / stem.name for _, stem in written}, "results": out / "results.json",
            "summary": summary, "rows": rows}


if __name__ == "__main__":
    main()
