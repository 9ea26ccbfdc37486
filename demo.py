"""`make demo`: the whole method on the embedded demo data, one command.

    python demo.py [--out runs/demo] [--pretrain-steps N] [--seg-steps N] [--transfer-steps N]
                   [--readme README.md] [--diagnostics docs/training.md]

1. builds the demo data set (persons made from the MNI152 template inside the nilearn wheel;
   BraTS-layout T1/T1ce/T2/FLAIR with tumour labels, plus CT/PET of the same persons),
2. pre-trains (full preset) on the training persons,
3. tunes segmentation (TC/WT/ET, trained for any subset of the 4 modalities) and modality transfer
   (any -> all) from the pre-trained weights,
4. evaluates both on the held-out test persons: prints the transfer and segmentation tables
   (segmentation from all four modalities; --seg-subsets all scores each of the 15 subsets),
   writes NIfTI predictions and PNG figures under OUT/eval-*,
5. predicts, as a new user would with predict.py, the other three modalities and a segmentation
   of one held-out person from its T1 alone: NIfTI files on the T1's grid in OUT/predict/<person>/.

A second run reuses the data, the cache and every finished stage (each stage resumes from its
OUT/*/last.pt). --readme FILE replaces the `demo` section of FILE with the headline numbers and
the stage times (summed over every run into OUT, OUT/times.json); --diagnostics FILE the
`demo-pretrain` section of FILE with the pre-training's diagnostics, read from its log. The configuration below is sized for 2 CPU cores (small feature size and roi);
on a GPU the same command runs the same configuration faster.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import layouts
from files import atomic, git_commit, replace_section, write_json


# The network's geometry. "demo" is small enough for 2 CPU cores: F = 12, roi 32 x 64 x 64 (the
# rotations of pre-training turn the sagittal y-z plane, the last two axes, which the crop holds
# almost whole); its bottleneck grid is 1 x 2 x 2, so the prior attention's channel tokens hold 4
# values. "mechanism": roi 64^3, a 2^3 grid (8 values, 2 heads of 4), the smallest at which the
# mechanism can be judged. "mechanism3": the paper's grid at F = 12, roi 96^3, a 3^3 grid (27
# values, 3 heads of 9). "paper": F = 48 at the same grid.
SIZES = {"demo": ["--roi", "32,64,64", "--feature-size", "12", "--prior-heads", "2"],
         "mechanism": ["--roi", "64", "--feature-size", "12", "--prior-heads", "2"],
         "mechanism3": ["--roi", "96", "--feature-size", "12", "--prior-heads", "3"],
         "paper": ["--roi", "96", "--feature-size", "48", "--prior-heads", "3"]}
# No DataLoader worker: on 2 cores a worker process preparing the next crop competes with the two
# threads of the step (crops are the same whatever the workers).
RUN = ["--workers", "0", "--resume", "auto", "--save-every", "20"]


def pretrain(data_name, out, steps, preset, seed, size="demo", flags=()):
    """train_pretrain.py in the demo configuration (at the geometry SIZES[size]), with extra
    `flags` of train_pretrain.py; returns the checkpoint path."""
    import train_pretrain

    return train_pretrain.main(["--data", data_name, "--out", str(out), "--max-steps", str(steps), "--preset", preset,
                                "--lr", "5e-4", "--seed", str(seed), "--id-every", "20", *SIZES[size], *RUN, *flags])


def tune(data_name, out, task, init, steps, seed, arch="full", labelled=0, val_every=-1, size="demo"):
    """train_downstream.py in the demo configuration, by default without validation (the test
    persons are scored by evaluate_once); labelled: tune on that many of the training persons.
    Validation, when asked for, uses the evaluation's window overlap (0.25)."""
    import train_downstream

    train_downstream.main(["--data", data_name, "--out", str(out), "--task", task, "--init", init, "--arch", arch,
                           "--max-steps", str(steps), "--val-every", str(val_every), "--lr", "5e-4", "--seed", str(seed),
                           "--labelled", str(labelled), "--overlap", "0.25",
                           *(["--fg-fraction", "0.7"] if task == "seg" else []), *SIZES[size], *RUN])


def stage(title):
    print(f"\n=== {title} ===", file=sys.stderr, flush=True)
    return time.perf_counter()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    # budgets sized so that the whole demo, set-up included, ends within 15 minutes on 2 CPU
    # cores (the stage times it measured: the README's demo section)
    ap.add_argument("--pretrain-steps", type=int, default=24)
    ap.add_argument("--seg-steps", type=int, default=16)
    ap.add_argument("--transfer-steps", type=int, default=6)
    ap.add_argument("--eval-overlap", type=float, default=0.25, help="sliding-window overlap of the evaluation")
    ap.add_argument("--seg-subsets", choices=("given", "all"), default="given",
                    help="segmentation evaluated from all four modalities, or from each of the 15 subsets (Table 11)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readme", default="", help="replace the demo section of this Markdown file with the headline")
    ap.add_argument("--diagnostics", default="",
                    help="replace the demo-pretrain section of this Markdown file with the pre-training diagnostics")
    args = ap.parse_args(argv)
    out = Path(args.out)
    times, commit = {}, git_commit()  # the code that runs, read before it runs

    t = stage("1/6 demo data")
    root = layouts.ensure_demo(seed=args.seed)
    print(f"demo data in {root}", file=sys.stderr)
    times["data"] = time.perf_counter() - t

    t = stage("2/6 pre-training (full preset)")
    ckpt = pretrain("demo", out / "pretrain", args.pretrain_steps, "full", args.seed)
    times["pretrain"] = time.perf_counter() - t

    t = stage("3/6 segmentation tuning from the pre-trained weights")
    tune("demo", out / "seg", "seg", f"ours:{ckpt}", args.seg_steps, args.seed)
    times["seg"] = time.perf_counter() - t

    t = stage("4/6 transfer tuning (any modality -> all) from the pre-trained weights")
    tune("demo", out / "transfer", "transfer", f"ours:{ckpt}", args.transfer_steps, args.seed)
    times["transfer"] = time.perf_counter() - t

    t = stage("5/6 evaluation on the test persons")
    results = {}
    for task in ("transfer", "seg"):
        extra = ["--subsets", args.seg_subsets] if task == "seg" else []
        results[task] = evaluate_once(out / task, out / f"eval-{task}", task, args.eval_overlap, extra=extra, figures=1)
    times["evaluate"] = time.perf_counter() - t

    t = stage("6/6 prediction for a held-out person from T1 alone (predict.py)")
    where = predict_once(out, out / "predict")
    times["predict"] = time.perf_counter() - t
    times = add_times(out / "times.json", times)
    text = summary(results, where, times, commit)
    print("\n" + text, file=sys.stderr)
    if args.readme:
        copy_figures(out, where, Path(args.readme).parent / "docs")
        replace_section(args.readme, "demo", text)
    if args.diagnostics:
        replace_section(args.diagnostics, "demo-pretrain", pretrain_diagnostics(out / "pretrain" / "log.jsonl", commit))
    return results


def add_times(path, times):
    """This run's stage times added to those of the earlier runs into the same folder (a rerun
    that reuses every stage does not report its few seconds as the demo's time)."""
    total = json.loads(path.read_text()) if path.exists() else {}
    total = {k: total.get(k, 0.0) + times.get(k, 0.0) for k in {**total, **times}}
    write_json(path, total)
    return total


def figures(out, where):
    """The demo's figures as the docs name them: predict.py's preview, the pre-training and
    segmentation-tuning curves, the first test person's segmentation and T1 -> all transfer,
    and the embedding of X_h' of the transfer evaluation."""
    person = where.name
    return {"demo_predict.png": where / "preview.png",
            "demo_pretrain_curves.png": out / "pretrain" / "loss_curves.png",
            "demo_seg_tuning_curves.png": out / "seg" / "loss_curves.png",
            "demo_seg.png": out / "eval-seg" / "figures" / f"{person}_seg.png",
            "demo_transfer.png": out / "eval-transfer" / "figures" / f"{person}_from_t1.png",
            "demo_embedding.png": out / "eval-transfer" / "figures" / "embedding.png"}


def copy_figures(out, where, docs):
    for name, src in figures(out, where).items():
        if not src.exists():
            raise SystemExit(f"{src}: missing, so {docs / name} cannot be refreshed")
        with atomic(docs / name) as tmp:
            shutil.copyfile(src, tmp)


def summary(results, where, times, commit):
    """What make demo measured: the headline, the T1-alone segmentation, the stage times."""
    import torch

    voxels = json.loads((where / "report.json").read_text())["outputs"]["seg.nii.gz"]["voxels"]
    lines = [f"Made by `python demo.py` (`make demo`) on {'a GPU' if torch.cuda.is_available() else 'CPU'}, "
             f"commit {commit}; stage times (s, summed over its runs): "
             + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"; total {sum(times.values()):.0f}.",
             "", "```text", headline(results),
             f"predict.py from T1 alone ({where.name}): {sum(voxels.values())} tumour voxels segmented", "```"]
    return "\n".join(lines)


def pretrain_diagnostics(log, commit, block=8):
    """The pre-training's log.jsonl by blocks of steps: means of L_equ, F_equ's accuracy and L_inv,
    the range of the gradient norm, and the last value of the prior's change, its share of X_h'
    and the val persons' identification."""
    import numpy as np
    import runtime

    rows = [r for r in runtime.read_jsonl(log) if "equ" in r]
    if not rows:
        raise SystemExit(f"{log}: no pre-training steps logged")
    out = ["| steps | L_equ (mean) | F_equ accuracy (mean) | L_inv (mean) | gradient norm (min-max) "
           "| prior_change (last) | prior_share (last) | val person-ID (last) |", "|---|---|---|---|---|---|---|---|"]
    for start in range(0, len(rows), block):
        part = rows[start:start + block]
        have = lambda k: [r[k] for r in part if r.get(k) is not None] or [float("nan")]
        out.append(f"| {part[0]['step']}-{part[-1]['step']} | {np.mean(have('equ')):.3f} | "
                   f"{np.mean(have('equ_acc')):.2f} | {np.mean(have('inv')):.2g} | {min(have('grad_norm')):.0f}-"
                   f"{max(have('grad_norm')):.0f} | {have('prior_change')[-1]:.3f} | {have('prior_share')[-1]:.2f} | "
                   f"{have('id_acc')[-1]:.2f} |")
    chance = next((r["id_chance"] for r in reversed(rows) if r.get("id_chance") is not None), float("nan"))
    return (f"Made by `make demo` (demo.py --diagnostics) from {log} ({len(rows)} steps, commit {commit}; "
            f"person identification chance {chance:.3f}):\n\n" + "\n".join(out))


def evaluate_once(run, dest, task, overlap, data_name="demo", extra=(), figures=2):
    """evaluate.py on the test persons of a tuned run (figures of the first `figures` of them),
    unless dest already holds the results of this very checkpoint (a rerun reuses them). Returns
    the results.json content."""
    import evaluate

    ckpt = run / "best.pt" if (run / "best.pt").exists() else run / "last.pt"
    results = dest / "results.json"
    argv = ["--ckpt", str(ckpt), "--data", data_name, "--task", task, "--out", str(dest), "--figures", str(figures),
            "--overlap", str(overlap), *extra]
    if results.exists() and results.stat().st_mtime > ckpt.stat().st_mtime:
        old = json.loads(results.read_text())
        if _same_options(old["meta"]["config"], evaluate.options(evaluate.parse_args(argv))):
            print(f"{results}: up to date with {ckpt}, reused", file=sys.stderr)
            for md in sorted(dest.glob("table*.md")):
                print(f"\n{md.name}\n\n{md.read_text()}", end="")
            return old
    evaluate.main(argv)
    return json.loads(results.read_text())


def predict_once(run, dest):
    """predict.py on the first test person of the transfer run, from its T1 alone, with both
    tuned checkpoints (again only when a checkpoint is newer than the outputs). Returns the
    person's output folder."""
    import predict

    ckpts = [d / "best.pt" if (d / "best.pt").exists() else d / "last.pt" for d in (run / "transfer", run / "seg")]
    person = json.loads((run / "transfer" / "split.json").read_text())["test"][0]
    spec = layouts.resolve("demo")
    t1 = spec.case(person).images["t1"]
    out = dest / person
    newer = (out / "report.json").exists() and any(c.stat().st_mtime > (out / "report.json").stat().st_mtime
                                                    for c in ckpts)
    code = predict.main(["--ckpt", str(ckpts[0]), "--seg-ckpt", str(ckpts[1]), "--input", f"t1={t1}",
                         "--out", str(out), "--preview", *(["--overwrite"] if newer else [])])
    if code:
        raise SystemExit(f"predict.py failed on {t1}")
    for f in sorted(out.iterdir()):
        print(f"  {f}", file=sys.stderr)
    voxels = json.loads((out / "report.json").read_text())["outputs"]["seg.nii.gz"]["voxels"]
    print(f"  segmentation from T1 alone: {sum(voxels.values())} tumour voxels "
          f"({', '.join(f'label {k}: {v}' for k, v in voxels.items()) or 'none'})", file=sys.stderr)
    return out


def _same_options(have, want):
    """Whether results made with the configuration `have` used the options `want` (parsed
    evaluate.py arguments) that change the numbers."""
    keys = ("ckpt", "split", "overlap", "sw_batch_size", "protocol", "subsets", "hd95", "save_nifti", "figures")
    return all(have.get(k) == want[k] for k in keys)


def headline(results):
    """The demo's two numbers: whole-tumour Dice from all modalities, strict PSNR vs identity."""
    lines = []
    if "seg" in results:
        key = max(results["seg"]["summary"], key=lambda k: k.count("+"))
        wt = results["seg"]["summary"][key].get("WT")
        if wt is not None:
            lines.append(f"segmentation from {key}: whole-tumour Dice {wt:.3f} on the test persons")
    if "transfer" in results:
        pairs = {k: p for k, p in results["transfer"]["summary"].get("strict", {}).items()
                 if k.split(">")[0] != k.split(">")[1]}  # the identity is exact on its own modality
        if pairs:
            ours = sum(p["psnr"] for p in pairs.values()) / len(pairs)
            base = sum(p["identity_psnr"] for p in pairs.values()) / len(pairs)
            lines.append(f"transfer, mean over {len(pairs)} source->target pairs: strict PSNR {ours:.2f} dB "
                         f"(identity baseline {base:.2f} dB)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
