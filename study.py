"""`make study`: the paper's comparisons on the embedded demo data, at a stated budget and seed.

    python study.py [--out runs/study] [--seed 0] [--readme README.md] [budget flags]

1. BraTS-layout MRI (t1, t1ce, t2, flair): the demo pipeline (full pre-training, segmentation
   and transfer tuning, evaluation) as "ours";
2. the SwinUNETR baseline: plain SwinUNETR pre-trained with L_decom only, tuned for transfer
   with the same budget (Table 10 format, strict and reference protocols, plus the identity
   baseline: the normalised source itself as the prediction);
3. segmentation from scratch with the same tuning budget as ours (Table 11 format);
4. PET/CT (AutoPET layout): pre-training presets 1-6 of Table 7, each tuned for lesion
   segmentation with the same budget, and the same tuning from scratch (Tables 7 and 8 format).

Every stage resumes (OUT/<run>/last.pt) and an evaluation whose results are newer than its
checkpoint is reused, so an interrupted study continues where it stopped. The tables, with
seed, commit and configuration, go to OUT/STUDY.md (and .json); with --readme the section
between the study markers of that file is replaced by them, and the figures it shows are copied
to docs/.
"""
import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

import demo
import report
from files import git_commit, write_json, write_text

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
TABLE7 = {"1": "C + D + E", "2": "C + D + I", "3": "C + D + E + I (no prior)", "4": "C + D + E + prior",
          "5": "C + D + I + prior", "6": "C + D + E + I + prior (ours)"}
MODS = ("t1", "t1ce", "t2", "flair")
FIGURES = (  # README figure, its source under OUT/mri, caption
    ("demo_pretrain_curves.png", "pretrain/loss_curves.png",
     "Loss curves of the demo pre-training (every term; a reference for your own runs)"),
    ("demo_seg_tuning_curves.png", "seg/loss_curves.png", "Loss curves of the demo segmentation tuning"),
    ("demo_transfer.png", "eval-transfer/figures/*_from_t1.png",
     "A test person, T1 as the only input: rows = targets; input, generated, truth, signed difference "
     "(red: too bright, blue: too dark) on three mid-slices"),
    ("demo_seg.png", "eval-seg/figures/*_seg.png",
     "Segmentation from all four modalities on a test person (prediction and truth)"),
    ("demo_embedding.png", "eval-transfer/figures/embedding.png",
     "PCA of X_h' of the test persons, coloured by modality and person (Figure 9)"),
)


def num(v):
    """A number from results.json, where NaN is null and inf is spelled as a string."""
    return math.nan if v is None else float(v)


def pct(v):
    return 100.0 * num(v)


def transfer_rows(method, res, prefix=""):
    """One row per source: PSNR / SSIM per target (strict protocol) and the means over the other
    targets under both protocols. prefix "identity_" reads the identity baseline's numbers, which
    are exact (and not shown) on the source's own modality."""
    strict, ref = res["summary"]["strict"], res["summary"]["reference"]
    rows = []
    for s in MODS:
        shown = [t for t in MODS if f"{s}>{t}" in strict and not (prefix and t == s)]
        if not shown:
            continue
        row = {"method": method, "source": s.upper()}
        for t in MODS:
            m = strict.get(f"{s}>{t}") if t in shown else None
            row[t.upper()] = f"{m[prefix + 'psnr']:.2f} / {m[prefix + 'ssim']:.3f}" if m else "-"
        others = [f"{s}>{t}" for t in shown if t != s]
        row["mean PSNR (strict)"] = sum(strict[k][prefix + "psnr"] for k in others) / len(others)
        row["mean PSNR (reference)"] = sum(ref[k][prefix + "psnr"] for k in others) / len(others)
        row["mean SSIM (reference)"] = sum(ref[k][prefix + "ssim"] for k in others) / len(others)
        rows.append(row)
    return rows


def mean_of(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def seg_row(method, res):
    """All inputs together, and the mean over the 15 subsets (Table 11), Dice in %."""
    summ = res["summary"]
    full = summ["+".join(MODS)]
    row = {"method": method}
    for r in ("WT", "TC", "ET"):
        row[f"{r} (all inputs)"] = pct(full[r])
    for r in ("WT", "TC", "ET"):
        row[f"{r} (mean of {len(summ)} subsets)"] = pct(sum(s[r] for s in summ.values()) / len(summ))
    return row


def autopet_row(label, res, **extra):
    a = res["summary"]["ct+pet"]["autopet"]
    return {**extra, "pre-training": label, "Dice": pct(a["dice"]), "Dice-": pct(a["dice_minus"]), "TPR": pct(a["tpr"]),
            "TNR": pct(a["tnr"]), "FNR": pct(a["fnr"]), "FPR": pct(a["fpr"]), "FP vol (mL)": num(a["fp_volume_ml"]),
            "FN vol (mL)": num(a["fn_volume_ml"])}


def verdict(ok, text):
    return f"- {'holds' if ok else 'does not hold'}: {text}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=15, help="MRI pre-training steps (ours and SwinUNETR)")
    ap.add_argument("--seg-steps", type=int, default=50, help="MRI segmentation tuning steps (ours and scratch)")
    ap.add_argument("--transfer-steps", type=int, default=15, help="MRI transfer tuning steps (ours and SwinUNETR)")
    ap.add_argument("--petct-pretrain-steps", type=int, default=10, help="PET/CT pre-training steps per preset")
    ap.add_argument("--petct-seg-steps", type=int, default=40, help="PET/CT lesion tuning steps per run")
    ap.add_argument("--eval-overlap", type=float, default=0.25)
    ap.add_argument("--readme", default="", help="replace the study section of this file with the results")
    args = ap.parse_args(argv)
    out, seed = Path(args.out), args.seed

    # 1. ours on MRI: the demo pipeline
    ours = demo.main(["--out", str(out / "mri"), "--pretrain-steps", str(args.pretrain_steps), "--seg-steps",
                      str(args.seg_steps), "--transfer-steps", str(args.transfer_steps), "--eval-overlap",
                      str(args.eval_overlap), "--seed", str(seed), "--seg-subsets", "all"])
    mri = out / "mri"
    # 2. the SwinUNETR baseline for transfer
    demo.stage("study: SwinUNETR baseline (L_decom only), transfer")
    base = demo.pretrain("demo", mri / "pretrain-swinunetr", args.pretrain_steps, "swinunetr", seed)
    demo.tune("demo", mri / "transfer-swinunetr", "transfer", f"ours:{base}", args.transfer_steps, seed,
              arch="swinunetr")
    swin_t = demo.evaluate_once(mri / "transfer-swinunetr", mri / "eval-transfer-swinunetr", "transfer",
                                args.eval_overlap)
    # 3. segmentation from scratch
    demo.stage("study: segmentation from scratch")
    demo.tune("demo", mri / "seg-scratch", "seg", "scratch", args.seg_steps, seed)
    scratch_s = demo.evaluate_once(mri / "seg-scratch", mri / "eval-seg-scratch", "seg", args.eval_overlap)
    # 4. PET/CT: Table 7 presets and scratch
    petct = out / "petct"
    table7 = {}
    for preset in TABLE7:
        demo.stage(f"study: PET/CT preset {preset} ({TABLE7[preset]})")
        ck = demo.pretrain("demo-petct", petct / f"pretrain-{preset}", args.petct_pretrain_steps, preset, seed)
        demo.tune("demo-petct", petct / f"seg-{preset}", "seg", f"ours:{ck}", args.petct_seg_steps, seed)
        table7[preset] = demo.evaluate_once(petct / f"seg-{preset}", petct / f"eval-seg-{preset}", "seg",
                                            args.eval_overlap, "demo-petct", ["--subsets", "given"])
    demo.stage("study: PET/CT lesion segmentation from scratch")
    demo.tune("demo-petct", petct / "seg-scratch", "seg", "scratch", args.petct_seg_steps, seed)
    pet_scratch = demo.evaluate_once(petct / "seg-scratch", petct / "eval-seg-scratch", "seg", args.eval_overlap,
                                     "demo-petct", ["--subsets", "given"])

    # tables
    meta = {"seed": seed, "commit": git_commit(), "config": {**vars(args), "model": "F=12, roi 32x64x64, "
            "prior heads 2, AdamW lr 5e-4, batch 1, 1 process on CPU"},
            "test persons": ours["seg"]["meta"]["cases"]}
    t10 = transfer_rows("SwinUNETR (L_decom)", swin_t) + transfer_rows("ours", ours["transfer"]) \
        + transfer_rows("identity (source as prediction)", ours["transfer"], "identity_")
    seg = [seg_row("scratch", scratch_s), seg_row("ours", ours["seg"])]
    t7 = [autopet_row(TABLE7[p], r, ID=p) for p, r in table7.items()]
    t8 = [autopet_row("scratch", pet_scratch), autopet_row("ours (preset 6)", table7["6"])]
    tables = [
        ("table10_transfer", "Transfer on the MRI test persons (Table 10 format): PSNR (dB) / SSIM per target, "
         "strict protocol (foreground voxels only); mean PSNR under both protocols", t10),
        ("table11_seg", "BraTS-region segmentation on the MRI test persons, Dice (%): scratch vs ours, same tuning "
         "budget (Table 11 format)", seg),
        ("table7_presets", "PET/CT lesion segmentation after each pre-training preset (Table 7 format, %)", t7),
        ("table8_autopet", "PET/CT lesion segmentation, scratch vs ours (Table 8 format, %)", t8),
    ]
    claims = claims_text(t10, seg, t7, t8)
    md = render(args, meta, tables, claims, out)
    write_text(out / "STUDY.md", md)
    write_json(out / "STUDY.json", {"meta": meta, "tables": {k: rows for k, _, rows in tables}, "claims": claims})
    print("\n" + md)
    if args.readme:
        update_readme(Path(args.readme), md, out)
    return {"tables": {k: rows for k, _, rows in tables}, "claims": claims}


def claims_text(t10, seg, t7, t8):
    ours = [r for r in t10 if r["method"] == "ours"]
    swin = [r for r in t10 if r["method"].startswith("SwinUNETR")]
    ident = [r for r in t10 if r["method"].startswith("identity")]
    o, s, i = (mean_of(x, "mean PSNR (strict)") for x in (ours, swin, ident))
    dice = {r["ID"]: r["Dice"] for r in t7}
    best = max(t7, key=lambda r: r["Dice"])
    helps = sum(dice[b] > dice[a] for a, b in (("1", "4"), ("2", "5"), ("3", "6")))
    return [
        verdict(o > i, f"transfer beats the identity baseline: strict PSNR {o:.2f} vs {i:.2f} dB (mean of 12 pairs)"),
        verdict(o > s, f"ours beats the SwinUNETR baseline in transfer (Table 10): strict PSNR {o:.2f} vs {s:.2f} dB"),
        verdict(seg[1]["WT (all inputs)"] >= 60.0, f"segmentation tuned from the pre-train reaches whole-tumour "
                f"Dice >= 60%: {seg[1]['WT (all inputs)']:.1f}%"),
        verdict(seg[1]["WT (all inputs)"] > seg[0]["WT (all inputs)"], "pre-training beats scratch in MRI "
                f"segmentation: WT Dice {seg[1]['WT (all inputs)']:.1f}% vs {seg[0]['WT (all inputs)']:.1f}%"),
        verdict(t8[1]["Dice"] > t8[0]["Dice"], f"pre-training beats scratch in PET/CT lesion segmentation (Table 8): "
                f"Dice {t8[1]['Dice']:.1f}% vs {t8[0]['Dice']:.1f}%"),
        verdict(best["ID"] == "6", f"all constraints with the prior is the best preset (Table 7): best is preset "
                f"{best['ID']} ({best['pre-training']}, Dice {best['Dice']:.1f}%), preset 6 has "
                f"{dice['6']:.1f}%"),
        verdict(helps == 3, f"adding the prior improves every constraint set (Table 7: 4 > 1, 5 > 2, 6 > 3): "
                f"{helps} of 3"),
    ]


def render(args, meta, tables, claims, out):
    records = [json.loads(line) for log in sorted(out.rglob("log.jsonl")) for line in log.read_text().splitlines()
               if line.strip()]
    steps = [r["step_s"] for r in records if r.get("step_s") is not None]
    lines = [f"Made by `python study.py` (`make study`) on {'a GPU' if torch.cuda.is_available() else 'CPU'}"
             f" ({len(steps)} logged training steps, {sum(steps) / 60:.0f} min of training in all, evaluations "
             f"not counted); seed {meta['seed']}, commit "
             f"{meta['commit']}. Budget: MRI pre-training {args.pretrain_steps} steps, segmentation tuning "
             f"{args.seg_steps}, transfer tuning {args.transfer_steps}; PET/CT pre-training {args.petct_pretrain_steps} "
             f"steps per preset, lesion tuning {args.petct_seg_steps}. {meta['config']['model']}. "
             f"Test persons: {', '.join(meta['test persons'])} (MRI and PET/CT are the same persons). "
             f"Tables with their configuration: {out}/STUDY.json.", ""]
    for name, title, rows in tables:
        lines += [f"**{title}**", "", report.markdown(rows, list(rows[0]), 2).rstrip(), ""]
    lines += ["Which of the paper's claims hold on this data, at this budget (one seed, 6 test persons: "
              "differences of a few points are within noise):", "", *claims, ""]
    return "\n".join(lines)


def update_readme(path, md, out):
    """Replaces the text between the study markers; copies the figures it shows to docs/."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no '{BEGIN}' ... '{END}' section to replace")
    docs = path.parent / "docs"
    docs.mkdir(exist_ok=True)
    shown = []
    for name, pattern, caption in FIGURES:
        found = sorted((out / "mri").glob(pattern))
        if found:
            shutil.copyfile(found[0], docs / name)
            shown += [f"{caption}:", "", f"![{caption}](docs/{name})", ""]
    md = md + "\n" + "\n".join(shown)
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    write_text(path, f"{head}{BEGIN}\n{md}\n{END}{tail}")
    print(f"{path}: study section replaced; figures in {docs}", file=sys.stderr)


if __name__ == "__main__":
    main()
