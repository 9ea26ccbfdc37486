"""`make study`: the paper's comparisons on the embedded demo data, over several seeds.

    python study.py [--out runs/study] [--seeds 0,1,2] [--results docs/results.md] [--readme README.md]
                    [budget flags]

For each seed (the seed draws the split, the initial weights, the crops and the transforms):
MRI (BraTS layout: t1, t1ce, t2, flair)
  1. pre-training: the full preset ("ours") and the SwinUNETR baseline (L_decom only);
  2. segmentation tuned from ours and from scratch, with every training person labelled and with
     only --labelled of them (the rest seen by the pre-training only), the val persons scored
     every --val-every steps (the learning curves);
  3. transfer tuned from ours and from the SwinUNETR baseline (and the identity baseline: the
     source itself as the prediction);
  4. person identification from X_h' (untrained, SwinUNETR baseline, ours);
PET/CT (AutoPET layout: ct, pet)
  5. each pre-training preset of --petct-presets (Table 7), tuned for lesion segmentation, its
     person identification; and the same tuning from scratch (none with --petct-presets "").
--preset-size sets the network's geometry (demo.SIZES; the mechanism needs a bottleneck grid of
at least 2^3, which "demo" does not have); --option adds preset 6p (L_pers beside the paper's
losses; --option 6v: L_var; 6vc: L_var and L_cov over 4 persons at the same views; 6pz, 6pf,
residual, cosine or no-skips: the options of train_pretrain.py) to pre-training, identification and
transfer; --section names the sections written.
Every run resumes (OUT/.../last.pt) and a finished run or an evaluation newer than its
checkpoint is reused, so an interrupted study continues where it stopped and never repeats
finished work. Each stage prints a progress line with the time elapsed and an estimate of the
time left.

Tables give mean +- standard deviation over the seeds. A claim compares two methods seed by seed:
it "holds" when the mean difference exceeds twice its standard error, "does not hold" when it
is below minus twice that, and is "within noise" otherwise. A budget counts as flattened when
the last 20% of a run improved its curve by less than the thresholds in FLAT. The tables, with
seeds, commit, budgets and the time taken, go to OUT/STUDY.md (and .json); --results FILE
replaces the section between the `study` markers of FILE with them (the learning curves are
copied beside FILE), --readme FILE the `study-claims` section of FILE with the claims alone.
"""
import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

import demo
import metrics
import report
import runtime as R
from files import atomic, git_commit, replace_section, write_json, write_text

# The options beside the paper's form (--option NAME): the pre-training preset and the extra flags
# of train_pretrain.py (docs/method.md).
OPTIONS = {"6p": ("6p", ()), "6v": ("6v", ()), "6vc": ("6vc", ("--same-views", "--batch-size", "4")),
           "6pz": ("6pz", ("--same-views", "--batch-size", "4", "--pers-centre")),
           "6pf": ("6p", ("--same-views", "--batch-size", "4", "--pers-centre", "--prior-fuse", "prior")),
           "residual": ("full", ("--prior-fuse", "residual")),
           "cosine": ("full", ("--prior-logits", "cosine")), "no-skips": ("full", ("--decom-skips", "none"))}
# The options' own person terms whose curves the flattening check reads beside L_equ and L_decom.
OWN_TERMS = {"6p": ("pers",), "6pz": ("pers_zp",), "6pf": ("pers",)}
# Cost of a step (or an evaluation) at each --preset-size relative to the demo's on 2 CPU cores:
# it scales RATE in the first estimate of the time left (mechanism: the ratio of the pre-training
# step times, bench.py steps; mechanism3: make study-mechanism-3's measured time against that estimate;
# paper: of their FLOPs, bench.py flops).
COST = {"demo": 1.0, "mechanism": 1.5, "mechanism3": 6.0, "paper": 80.0}
TABLE7 = {"1": "C + D + E", "2": "C + D + I", "3": "C + D + E + I (no prior)", "4": "C + D + E + prior",
          "5": "C + D + I + prior", "6": "C + D + E + I + prior (ours)"}
MODS = ("t1", "t1ce", "t2", "flair")
# A curve has flattened when its last 20% improved it by less than this: losses relative to
# their value, validation Dice in absolute points (0..1).
FLAT = {"loss": 0.05, "dice": 0.02}
# Seconds per step (or per evaluation) on 2 CPU cores in the demo configuration, measured on the
# demo data: the first estimate of the time left, replaced by what the study measures as it goes.
# A validation of the 6 val persons costs about as much as VALIDATION tuning steps.
RATE = {"pretrain": 4.4, "pretrain-swinunetr": 3.2, "seg": 3.8, "transfer": 3.8, "evaluate-seg": 36.0,
        "evaluate-transfer": 62.0, "identify": 4.0, "petct-pretrain": 2.5, "petct-seg": 2.0, "evaluate-petct": 25.0}
VALIDATION = 8
OVERLAP = "(overlapped by --jobs)"  # times.json: stage seconds that ran side by side


# ---- statistics -----------------------------------------------------------------------------


def mean_std(values):
    """(mean, sample standard deviation) of the finite values (std NaN for fewer than 2)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return metrics.nanmean(v), metrics.std(v) if len(v) > 1 else math.nan


def verdict(ours, other):
    """Seed-by-seed comparison of two lists of numbers (higher is better): (word, mean
    difference, its standard error). 'holds' when the mean difference exceeds twice its
    standard error, 'does not hold' when it is below minus twice, else 'within noise' (always
    so with one seed, whose error is unknown)."""
    d = np.asarray(ours, dtype=float) - np.asarray(other, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return "within noise", float(d.mean()) if len(d) else math.nan, math.nan
    m, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    return ("holds" if m > 2 * se else "does not hold" if m < -2 * se else "within noise"), m, se


def flattened(steps, values, kind):
    """How much the last 20% of a curve improved it, and whether that is under FLAT[kind].
    kind "loss" (lower is better; improvement relative to the mean over the 20% before) or
    "dice" (higher is better; the last value against the best one at or before 80% of the run)."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if len(values) < 2:
        return math.nan, False
    end = steps.max()
    if kind == "loss":
        before = values[(steps > 0.6 * end) & (steps <= 0.8 * end)]
        last = values[steps > 0.8 * end]
        if not len(before) or not len(last):
            return math.nan, False
        gain = float((before.mean() - last.mean()) / abs(before.mean()))
    else:
        before = values[steps <= 0.8 * end]
        if not len(before):
            return math.nan, False
        gain = float(values[-1] - before.max())
    return gain, gain < FLAT[kind]


def read_log(run):
    return R.read_jsonl(Path(run) / "log.jsonl")


def fmt(m, s, digits=1):
    if not np.isfinite(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if np.isfinite(s) else f"{m:.{digits}f}"


# ---- progress -------------------------------------------------------------------------------


class Progress:
    """A line per finished stage: its time, the time elapsed and an estimate of the time left
    (RATE scaled by what this study has measured for each kind of stage)."""

    def __init__(self, stages, times=None, cost=1.0):
        self.stages, self.done, self.t0, self.cost = stages, 0, time.perf_counter(), cost
        self.scale = {}
        # seconds spent on each stage over every invocation (OUT/times.json): a resumed study
        # reports the time of all its parts, not of its last invocation
        self.times = Path(times) if times else None
        self.took = json.loads(self.times.read_text()) if self.times and self.times.exists() else {}

    def minutes(self):
        """The study's wall-clock minutes: the time of its stages less what --jobs overlapped."""
        return (sum(self.took.get(name, 0.0) for name, _, _ in self.stages) - self.took.get(OVERLAP, 0.0)) / 60

    def record(self, name, took):
        """The time of a stage that ran elsewhere (a --jobs worker)."""
        self.took[name] = self.took.get(name, 0.0) + took
        if self.times:
            write_json(self.times, self.took)

    def estimate(self, kind, units):
        return units * RATE[kind] * self.cost * self.scale.get(kind, 1.0)

    def run(self, name, kind, units, fn):
        t = time.perf_counter()
        demo.stage(f"study [{self.done + 1}/{len(self.stages)}] {name}")
        result = fn()
        took = time.perf_counter() - t
        if took > 0.2 * units * RATE[kind] * self.cost:  # a reused stage says nothing about the speed
            self.scale[kind] = took / (units * RATE[kind] * self.cost)
        self.took[name] = self.took.get(name, 0.0) + took
        if self.times:
            write_json(self.times, self.took)
        self.done += 1
        left = sum(self.estimate(k, u) for _, k, u in self.stages[self.done:])
        print(f"study [{self.done}/{len(self.stages)}] {name}: {took:.0f} s; elapsed "
              f"{(time.perf_counter() - self.t0) / 60:.1f} min, about {left / 60:.0f} min left", file=sys.stderr,
              flush=True)
        return result


# ---- runs -----------------------------------------------------------------------------------


def pretraining(data_name, run, steps, preset, seed, size, flags):
    """One pre-training stage (module-level, so that a --jobs worker process can run it)."""
    return finished(run, steps) or demo.pretrain(data_name, run, steps, preset, seed, size, flags)


def _exit_when_orphaned(parent):
    """Ends this process once `parent` (the study) is gone, killed or not, instead of running its
    stage to the end unseen; the stage's last checkpoint stays valid and a rerun resumes it."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _job(fn, threads, log, parent):
    """A stage in a --jobs worker process of the study `parent` (its pid): `threads` torch threads,
    its output appended to `log`; returns the seconds it took."""
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def run_side_by_side(stages, jobs, progress):
    """Runs the unfinished pre-trainings among `stages` `jobs` at a time, each in its own process
    with its share of this process's torch threads and its output in RUN.log beside its run
    folder; records their times in `progress`. The stages then find their runs finished."""
    todo = [(name, fn) for name, _, _, fn in stages if isinstance(fn, functools.partial)
            and fn.func is pretraining and not finished(fn.args[1], fn.args[2])]
    if jobs < 2 or len(todo) < 2:
        return
    threads = max(1, torch.get_num_threads() // jobs)
    print(f"study: {len(todo)} pre-trainings, {jobs} at a time with {threads} thread(s) each", file=sys.stderr,
          flush=True)
    t, took, failed = time.perf_counter(), 0.0, []
    # spawn: a forked child would inherit this process's thread pools
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        logs = {name: Path(fn.args[1]).with_suffix(".log") for name, fn in todo}
        futures = {pool.submit(_job, fn, threads, logs[name], os.getpid()): name for name, fn in todo}
        for done, future in enumerate(as_completed(futures), 1):
            name = futures[future]
            try:
                seconds = future.result()
            except Exception as e:  # the others finish; the study stops after them
                failed.append(f"{name} ({type(e).__name__}: {e}; its output: {logs[name]})")
                continue
            took += seconds
            progress.record(name, seconds)
            print(f"study: [{done}/{len(todo)} side by side] {name}: {seconds:.0f} s; elapsed "
                  f"{(time.perf_counter() - t) / 60:.1f} min", file=sys.stderr, flush=True)
    progress.record(OVERLAP, max(0.0, took - (time.perf_counter() - t)))
    if failed:
        raise SystemExit("study: " + "; ".join(failed))


def finished(run, steps):
    """Whether run/last.pt has reached `steps` steps: the study then skips the run (resuming it
    would rewrite its log and validate again)."""
    ckpt = Path(run) / "last.pt"
    return ckpt.exists() and torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"] >= steps


def configuration(ckpt):
    """The configuration the study trained with, read back from one of its checkpoints (every
    run is in-process: one process)."""
    ck = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    a, c = ck["arch"], ck["config"]
    return (f"F={a['feature_size']}, roi {'x'.join(map(str, a['roi']))}, prior heads {a['prior_heads']}, "
            f"AdamW lr {c['lr']:g}, batch {c['batch_size']}, 1 process")


def plan(args):
    """The study's stages in order: (name, kind, units, function); units are steps (or runs) of
    that kind of stage. Every function binds its own values (no late binding of loop names)."""
    p, out = args, Path(args.out)
    seg_sets, petct_sets = ["--subsets", p.seg_subsets], ["--subsets", "given"]
    vals = p.seg_steps // p.val_every if p.val_every > 0 else 0
    seg_units = 3 if p.seg_subsets == "all" else 1  # a guess: the 15 subsets share the loading and metrics

    def pretrain(data_name, run, steps, preset, seed, flags=()):
        return functools.partial(pretraining, data_name, run, steps, preset, seed, p.preset_size, tuple(flags))

    def tune(data_name, run, task, init, steps, seed, **kw):
        return lambda: finished(run, steps) or demo.tune(data_name, run, task, init, steps, seed, size=p.preset_size,
                                                         **kw)

    def evaluate(run, task, data_name, extra=(), dest=None):
        dest = dest or run.parent / f"eval-{run.name}"
        return lambda: demo.evaluate_once(run, dest, task, p.eval_overlap, data_name, list(extra))

    def identify(run, dest, data_name, untrained=False):
        return evaluate(run, "identify", data_name, ["--untrained"] if untrained else [], dest)

    # the pre-trainings and the identifications of every seed first: the mechanism's verdict does
    # not wait for the downstream runs (and is all that --part mechanism runs)
    stages = []
    for seed in p.seeds:
        mri = out / f"seed{seed}" / "mri"
        stages += [
            (f"seed {seed}: MRI pre-training, full preset", "pretrain", p.pretrain_steps,
             pretrain(p.data, mri / "pretrain", p.pretrain_steps, "full", seed)),
            (f"seed {seed}: MRI pre-training, SwinUNETR baseline", "pretrain-swinunetr", p.pretrain_steps,
             pretrain(p.data, mri / "pretrain-swinunetr", p.pretrain_steps, "swinunetr", seed))]
        if p.option:
            preset, flags = OPTIONS[p.option]
            stages.append((f"seed {seed}: MRI pre-training, option {p.option}", "pretrain", p.pretrain_steps,
                           pretrain(p.data, mri / f"pretrain-{p.option}", p.pretrain_steps, preset, seed, flags)))
        for name, run, untrained in identified(p.option):
            stages.append((f"seed {seed}: person identification, {name}", "identify", 1,
                           identify(mri / run, mri / f"id-{name}", p.data, untrained)))
    if p.part == "mechanism":
        return stages
    for seed in p.seeds:
        mri = out / f"seed{seed}" / "mri"
        ours = mri / "pretrain" / "last.pt"
        for regime, labelled in (("all", 0), ("few", p.labelled)):
            for init in ("ours", "scratch"):
                run = mri / f"seg-{regime}-{init}"
                stages += [
                    (f"seed {seed}: segmentation, {regime} labelled, {init}", "seg", p.seg_steps + VALIDATION * vals,
                     tune(p.data, run, "seg", f"ours:{ours}" if init == "ours" else "scratch", p.seg_steps, seed,
                          labelled=labelled, val_every=p.val_every)),
                    (f"seed {seed}: evaluation, segmentation {regime} {init}", "evaluate-seg", seg_units,
                     evaluate(run, "seg", p.data, seg_sets))]
        for init, arch, ck in transfer_runs(mri, p.option):
            run = mri / f"transfer-{init}"
            stages += [
                (f"seed {seed}: transfer, {init}", "transfer", p.transfer_steps,
                 tune(p.data, run, "transfer", f"ours:{ck}", p.transfer_steps, seed, arch=arch)),
                (f"seed {seed}: evaluation, transfer {init}", "evaluate-transfer", 1, evaluate(run, "transfer", p.data))]
    for seed in p.petct_seeds:
        pet = out / f"seed{seed}" / "petct"
        for preset in p.petct_presets:
            ck, run = pet / f"pretrain-{preset}" / "last.pt", pet / f"seg-{preset}"
            stages += [
                (f"seed {seed}: PET/CT pre-training, preset {preset}", "petct-pretrain", p.petct_pretrain_steps,
                 pretrain(p.data_petct, pet / f"pretrain-{preset}", p.petct_pretrain_steps, preset, seed)),
                (f"seed {seed}: PET/CT person identification, preset {preset}", "identify", 1,
                 identify(pet / f"pretrain-{preset}", pet / f"id-{preset}", p.data_petct)),
                (f"seed {seed}: PET/CT lesion tuning, preset {preset}", "petct-seg", p.petct_seg_steps,
                 tune(p.data_petct, run, "seg", f"ours:{ck}", p.petct_seg_steps, seed)),
                (f"seed {seed}: PET/CT evaluation, preset {preset}", "evaluate-petct", 1,
                 evaluate(run, "seg", p.data_petct, petct_sets))]
        run = pet / "seg-scratch"
        stages += [
            (f"seed {seed}: PET/CT lesion tuning, scratch", "petct-seg", p.petct_seg_steps,
             tune(p.data_petct, run, "seg", "scratch", p.petct_seg_steps, seed)),
            (f"seed {seed}: PET/CT evaluation, scratch", "evaluate-petct", 1,
             evaluate(run, "seg", p.data_petct, petct_sets))]
    return stages


def transfer_runs(mri, option):
    """(name, arch, pre-training checkpoint) of the transfer tunings."""
    runs = [("ours", "full", mri / "pretrain" / "last.pt"), ("swinunetr", "swinunetr", mri / "pretrain-swinunetr" / "last.pt")]
    return runs + ([(f"ours+{option}", "full", mri / f"pretrain-{option}" / "last.pt")] if option else [])


def identified(option):
    """(name, pre-training run, untrained) of the networks whose X_h' is identified."""
    nets = [("untrained", "pretrain", True), ("swinunetr", "pretrain-swinunetr", False), ("ours", "pretrain", False)]
    return nets + ([(f"ours+{option}", f"pretrain-{option}", False)] if option else [])


# ---- tables ---------------------------------------------------------------------------------


def seg_numbers(res):
    """WT / TC / ET Dice (%) from all inputs, and the mean WT over the evaluated subsets."""
    summ = res["summary"]
    full = summ[max(summ, key=lambda k: k.count("+"))]
    out = {r: 100 * full[r] for r in ("WT", "TC", "ET")}
    out["WT (mean of subsets)"] = 100 * float(np.mean([s["WT"] for s in summ.values()]))
    return out


def transfer_numbers(res, prefix=""):
    """Mean over the source != target pairs: strict PSNR, reference PSNR and SSIM."""
    strict, ref = res["summary"]["strict"], res["summary"]["reference"]
    pairs = [k for k in strict if k.split(">")[0] != k.split(">")[1]]
    return {"PSNR strict (dB)": float(np.mean([strict[k][prefix + "psnr"] for k in pairs])),
            "PSNR reference (dB)": float(np.mean([ref[k][prefix + "psnr"] for k in pairs])),
            "SSIM reference": float(np.mean([ref[k][prefix + "ssim"] for k in pairs]))}


def petct_numbers(res):
    a = res["summary"]["ct+pet"]["autopet"]
    return {"Dice (%)": 100 * a["dice"], "FP vol (mL)": a["fp_volume_ml"], "FN vol (mL)": a["fn_volume_ml"]}


def id_numbers(summary):
    """Raw identification of X_h', and the mechanism (metrics.representation_summary): the
    between-person fraction of X_h' and of z, centred identification from X_h', z and z' (where
    person information is lost), the prior attention's entropy over its maximum (NaN without the
    prior)."""
    mech = summary.get("mechanism", {})
    xh, z = mech.get("X_h'", {}), mech.get("z", {})
    return {"person-ID accuracy": summary["accuracy"], "chance": summary["chance"], "cos same": summary["cos_same"],
            "cos other": summary["cos_other"], "between (X_h')": xh.get("between", math.nan),
            "within (X_h')": xh.get("within", math.nan), "between (z)": z.get("between", math.nan),
            "ID centred": xh.get("accuracy_centred", math.nan),
            "ID centred (z)": z.get("accuracy_centred", math.nan),
            "ID centred (z')": mech.get("z'", {}).get("accuracy_centred", math.nan),
            "attention entropy / max": summary.get("attention_entropy_ratio", math.nan)}


def aggregate(rows_per_seed, label_keys, digits):
    """Rows of per-seed dicts (same labels) -> one row per label with 'mean ± std' cells (the
    "seed" entry of a row is not a column)."""
    groups = {}
    for row in rows_per_seed:
        groups.setdefault(tuple(row[k] for k in label_keys), []).append(row)
    out = []
    for labels, rows in groups.items():
        cell = dict(zip(label_keys, labels))
        for key in rows[0]:
            if key not in label_keys and key != "seed":
                cell[key] = fmt(*mean_std([r[key] for r in rows]), digits)
        cell["seeds"] = len(rows)
        out.append(cell)
    return out


def collect(args):
    """Per-seed numbers of every comparison, read back from the runs' results."""
    out, num = Path(args.out), {"seg": [], "transfer": [], "petct": [], "id": [], "flat": []}
    for seed in args.seeds:
        mri = out / f"seed{seed}" / "mri"
        downstream = args.part == "all"
        for regime in ("all", "few") if downstream else ():
            for init in ("ours", "scratch"):
                res = json.loads((mri / f"eval-seg-{regime}-{init}" / "results.json").read_text())
                num["seg"].append({"labelled": regime, "init": init, "seed": seed, **seg_numbers(res)})
        for init, _, _ in transfer_runs(mri, args.option) if downstream else ():
            res = json.loads((mri / f"eval-transfer-{init}" / "results.json").read_text())
            num["transfer"].append({"method": init, "seed": seed, **transfer_numbers(res)})
            if init == "ours":
                num["transfer"].append({"method": "identity", "seed": seed, **transfer_numbers(res, "identity_")})
        for name, _, _ in identified(args.option):
            res = json.loads((mri / f"id-{name}" / "results.json").read_text())["summary"]
            num["id"].append({"data": "MRI", "network": name, "seed": seed, **id_numbers(res)})
        for run, terms in (("pretrain", ("equ", "decom")), ("pretrain-swinunetr", ("decom",)),
                           *([(f"pretrain-{args.option}", ("equ", *OWN_TERMS.get(args.option, ()), "decom"))]
                             if args.option else [])):
            log = read_log(mri / run)
            for t in terms:
                gain, ok = flattened([r["step"] for r in log], [r.get(t) for r in log], "loss")
                num["flat"].append({"run": f"MRI {run}", "curve": f"L_{t}", "seed": seed, "gain": gain, "flat": ok})
        for regime in ("all", "few") if downstream else ():
            for init in ("ours", "scratch"):
                log = [r for r in read_log(mri / f"seg-{regime}-{init}") if "val_dice" in r]
                gain, ok = flattened([r["step"] for r in log], [r["val_dice"] for r in log], "dice")
                num["flat"].append({"run": f"MRI segmentation, {regime} labelled, {init}", "curve": "val Dice",
                                    "seed": seed, "gain": gain, "flat": ok})
    for seed in args.petct_seeds:
        pet = out / f"seed{seed}" / "petct"
        for preset in [*args.petct_presets, "scratch"]:
            res = json.loads((pet / f"eval-seg-{preset}" / "results.json").read_text())
            num["petct"].append({"pre-training": TABLE7.get(preset, preset), "ID": preset, "seed": seed,
                                 **petct_numbers(res)})
            if preset != "scratch":
                res = json.loads((pet / f"id-{preset}" / "results.json").read_text())["summary"]
                num["id"].append({"data": "PET/CT", "network": f"preset {preset}", "seed": seed, **id_numbers(res)})
                log = read_log(pet / f"pretrain-{preset}")
                gain, ok = flattened([r["step"] for r in log], [r.get("decom") for r in log], "loss")
                num["flat"].append({"run": f"PET/CT pretrain preset {preset}", "curve": "L_decom", "seed": seed,
                                    "gain": gain, "flat": ok})
    return num


def per_seed(rows, key, **match):
    """{seed: row[key]} of the rows matching every match item."""
    return {r["seed"]: r[key] for r in rows if all(r[k] == v for k, v in match.items())}


def paired(a, b):
    seeds = sorted(set(a) & set(b))
    return [a[s] for s in seeds], [b[s] for s in seeds]


def claims(num, args):
    """The paper's claims, each a seed-by-seed comparison with its verdict."""
    lines = []

    def claim(text, ours, other, unit):
        word, m, se = verdict(*paired(ours, other))
        digits = 3 if unit in ("SSIM", "accuracy", "fraction") else 2
        spread = f" ± {se:.{digits}f} (standard error)" if np.isfinite(se) else ""
        n = len(set(ours) & set(other))
        lines.append(f"- {word}: {text} (mean difference {m:+.{digits}f}{spread} {unit}, {n} seed{'s' * (n != 1)})")

    seg, tr, pet = num["seg"], num["transfer"], num["petct"]
    downstream = args.part == "all"
    for regime, what in (("all", "every training person labelled"), ("few", f"{args.labelled} labelled persons")
                         ) if downstream else ():
        claim(f"pre-training beats scratch in MRI segmentation, {what} (WT Dice from all inputs)",
              per_seed(seg, "WT", labelled=regime, init="ours"), per_seed(seg, "WT", labelled=regime, init="scratch"),
              "Dice points")
    if downstream:
        claim("ours beats the SwinUNETR baseline in transfer (Table 10, strict PSNR)",
              per_seed(tr, "PSNR strict (dB)", method="ours"), per_seed(tr, "PSNR strict (dB)", method="swinunetr"),
              "dB")
        if args.option:
            claim(f"the option ({args.option}) beats the SwinUNETR baseline in transfer (strict PSNR)",
                  per_seed(tr, "PSNR strict (dB)", method=f"ours+{args.option}"),
                  per_seed(tr, "PSNR strict (dB)", method="swinunetr"), "dB")
        claim("transfer beats the identity baseline (strict PSNR)", per_seed(tr, "PSNR strict (dB)", method="ours"),
              per_seed(tr, "PSNR strict (dB)", method="identity"), "dB")
        claim("transfer beats the identity baseline (reference SSIM)", per_seed(tr, "SSIM reference", method="ours"),
              per_seed(tr, "SSIM reference", method="identity"), "SSIM")
    presets = args.petct_presets
    if "6" in presets:
        claim("pre-training (preset 6) beats scratch in PET/CT lesion segmentation (Table 8)",
              per_seed(pet, "Dice (%)", ID="6"), per_seed(pet, "Dice (%)", ID="scratch"), "Dice points")
    for a, b in (("1", "4"), ("2", "5"), ("3", "6")):
        if a in presets and b in presets:
            claim(f"adding the prior improves {TABLE7[a]} (Table 7: preset {b} > {a})",
                  per_seed(pet, "Dice (%)", ID=b), per_seed(pet, "Dice (%)", ID=a), "Dice points")
    claim("ours identifies persons better than the SwinUNETR baseline from X_h' (MRI)",
          per_seed(num["id"], "person-ID accuracy", data="MRI", network="ours"),
          per_seed(num["id"], "person-ID accuracy", data="MRI", network="swinunetr"), "accuracy")
    # The mechanism (MRI): X_h' personal, i.e. between-person spread above the within-person one,
    # more than the baseline's z and the untrained network's; identification once the shared
    # offset is removed.
    ids = lambda key, net: per_seed(num["id"], key, data="MRI", network=net)
    for net in ["ours"] + ([f"ours+{args.option}"] if args.option else []):
        claim(f"{net}: X_h' is personal (between-person fraction above the within-person one)",
              ids("between (X_h')", net), ids("within (X_h')", net), "fraction")
        for other in ("swinunetr", "untrained"):
            claim(f"{net}: between-person fraction of X_h' above that of the {other} network",
                  ids("between (X_h')", net), ids("between (X_h')", other), "fraction")
            claim(f"{net}: centred person identification from X_h' above the {other} network's",
                  ids("ID centred", net), ids("ID centred", other), "accuracy")
    return lines


def learning_curves(args, png):
    """Validation Dice against tuning steps, ours vs scratch, both regimes (mean ± std over seeds)."""
    panels = {}
    for regime, title in (("all", "every training person labelled"), ("few", f"{args.labelled} labelled persons")):
        panels[title] = {}
        for init in ("ours", "scratch"):
            curves = {}
            for seed in args.seeds:
                for r in read_log(Path(args.out) / f"seed{seed}" / "mri" / f"seg-{regime}-{init}"):
                    if r.get("val_dice") is not None:
                        curves.setdefault(r["step"], []).append(100 * r["val_dice"])
            steps = sorted(curves)
            if steps:
                panels[title][init] = (steps, [np.mean(curves[t]) for t in steps], [np.std(curves[t]) for t in steps])
    return report.figure_curves(png, panels, "tuning step", "val Dice (%, mean of regions)")


def figure_name(section):
    """The learning curves of a study section, copied beside the --results file."""
    return f"{section}_learning_curves.png"


def made_by(args, meta, minutes):
    target = args.target or args.section
    how = (f"`python study.py` (`make {target}`)" if args.part == "all" else
           f"`python study.py --part mechanism` (the pre-trainings and identifications of `make {target}`)")
    jobs = f", the pre-trainings {args.jobs} at a time" if getattr(args, "jobs", 1) > 1 else ""
    return (f"Made by {how} on {'a GPU' if torch.cuda.is_available() else 'CPU'} in "
            f"{minutes:.0f} min{jobs}; seeds {', '.join(map(str, args.seeds))}"
            + (f" (PET/CT: {', '.join(map(str, args.petct_seeds))})" if args.petct_seeds else " (no PET/CT)")
            + f", commit {meta['commit']}.")


def render(args, meta, tables, claim_lines, flat_rows, minutes):
    budgets = f"MRI pre-training {args.pretrain_steps} steps (full preset, SwinUNETR baseline" + (
        f", option {args.option})" if args.option else ")")
    if args.part == "all":
        budgets += (f", segmentation tuning {args.seg_steps} (val every {args.val_every}), few-label regime "
                    f"{args.labelled} of the training persons, transfer tuning {args.transfer_steps}")
    if args.petct_seeds:
        budgets += (f"; PET/CT presets {', '.join(args.petct_presets)}: pre-training {args.petct_pretrain_steps} "
                    f"steps, lesion tuning {args.petct_seg_steps}")
    lines = [f"{made_by(args, meta, minutes)} Budgets: {budgets}. "
             f"{meta['model']}. Each seed draws its own split (6 test persons). Mean ± standard deviation over "
             f"the seeds. Tables with their configuration: {args.out}/STUDY.json.", ""]
    for title, rows in tables:
        if rows:
            lines += [f"**{title}**", "", report.markdown(rows, list(rows[0]), 2).rstrip(), ""]
    if args.part == "all":
        lines += ["**Learning curves** (validation Dice of the val persons against tuning steps, mean ± std over "
                  "the seeds):", "", f"![learning curves]({figure_name(args.section)})", ""]
    unflat = [r for r in flat_rows if r["flattened"] != "yes"]
    lines += [f"**Budgets.** A curve counts as flattened when its last 20% improved it by less than "
              f"{FLAT['loss']:.0%} (losses, relative) or {FLAT['dice'] * 100:.0f} Dice points (validation). "
              + ("Every curve flattened." if not unflat else
                 f"{len(unflat)} of {len(flat_rows)} did not, so the comparisons that rest on them are not "
                 f"informative at this budget: " + "; ".join(f"{r['run']} ({r['curve']})" for r in unflat) + "."),
              "", report.markdown(flat_rows, list(flat_rows[0]), 3).rstrip(), ""]
    lines += ["**The paper's claims at this budget** (holds: the mean difference over the seeds exceeds twice its "
              "standard error):", "", *claim_lines, ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the MRI comparisons")
    ap.add_argument("--petct-seeds", default="", help="seeds of the PET/CT comparisons (default: --seeds)")
    ap.add_argument("--data", default="demo", help="the MRI data set (BraTS layout)")
    ap.add_argument("--data-petct", default="demo-petct", help="the PET/CT data set (AutoPET layout)")
    ap.add_argument("--pretrain-steps", type=int, default=70, help="MRI pre-training steps (ours and SwinUNETR)")
    ap.add_argument("--seg-steps", type=int, default=30, help="MRI segmentation tuning steps")
    ap.add_argument("--val-every", type=int, default=10, help="score the val persons every N tuning steps")
    ap.add_argument("--labelled", type=int, default=4, help="labelled training persons of the few-label regime")
    ap.add_argument("--seg-subsets", default="given", choices=("given", "all"),
                    help="input subsets evaluated in segmentation: given (all four together) or all (the 15)")
    ap.add_argument("--transfer-steps", type=int, default=12, help="MRI transfer tuning steps (ours and SwinUNETR)")
    ap.add_argument("--petct-presets", default="6", help="Table 7 presets pre-trained on PET/CT")
    ap.add_argument("--petct-pretrain-steps", type=int, default=40, help="PET/CT pre-training steps per preset")
    ap.add_argument("--petct-seg-steps", type=int, default=60, help="PET/CT lesion tuning steps per run")
    ap.add_argument("--eval-overlap", type=float, default=0.25)
    ap.add_argument("--preset-size", default="demo", choices=sorted(demo.SIZES),
                    help="the network's geometry (demo.SIZES): demo (roi 32x64x64, F=12, a 1x2x2 bottleneck), "
                         "mechanism (roi 64^3, F=12, 2^3), mechanism3 (roi 96^3, F=12, the paper's 3^3 grid) or "
                         "paper (roi 96^3, F=48, 3^3)")
    ap.add_argument("--target", default=None,
                    help="the make command the made-by line of the sections names (default: make SECTION)")
    ap.add_argument("--option", nargs="?", const="6p", default="", choices=sorted(OPTIONS),
                    help="add an option beside the paper's form, its pre-training, identification and transfer: 6p "
                         "(the default of a bare --option: L_pers, other persons as negatives for X_h'), 6v "
                         "(L_var, a floor on the spread of X_h' across persons), 6vc (L_var and L_cov, that spread along "
                         "many directions, over the 4 persons of a step at the same views), 6pz (centred L_pers on X_h''s part "
                         "through the prior branch, the 4 persons of a step at the same views), 6pf (centred L_pers with X_h' = "
                         "Fuse([0, z']), no route around the prior attention), residual (X_h' = z + Fuse([z, "
                         "z'])), cosine (the prior attention's scaled cosine logits) or no-skips (L_decom's decoder "
                         "without the skips)")
    ap.add_argument("--section", default="study",
                    help="the name of the sections written into --results (NAME) and --readme (NAME-claims)")
    ap.add_argument("--results", default="", help="replace the study section of this Markdown file with the results")
    ap.add_argument("--readme", default="", help="replace the study-claims section of this Markdown file with the "
                                                 "claims")
    ap.add_argument("--part", default="all", choices=("all", "mechanism"),
                    help="all: every stage; mechanism: the MRI pre-trainings and person identifications alone (the "
                         "mechanism's verdict; the stages --part all runs first)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the pre-trainings this many at a time first, each process with its share of the "
                         "threads (on 2 cores, 2 jobs of 1 thread deliver more steps per second than 1 of 2)")
    ap.add_argument("--dry-run", action="store_true", help="list the stages and the time estimate, run nothing")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.petct_seeds = [int(s) for s in args.petct_seeds.split(",") if s] or args.seeds
    # --part mechanism runs no PET/CT: no preset, no seed
    args.petct_presets = [s for s in args.petct_presets.split(",") if s] if args.part == "all" else []
    args.petct_seeds = args.petct_seeds if args.petct_presets else []
    if any(p not in TABLE7 for p in args.petct_presets):
        raise SystemExit(f"--petct-presets {','.join(args.petct_presets)}: choose among {', '.join(TABLE7)}")
    out, commit = Path(args.out), git_commit()  # the code that runs, read before it runs

    stages = plan(args)
    progress = Progress([(name, kind, units) for name, kind, units, _ in stages],
                        None if args.dry_run else out / "times.json", COST[args.preset_size])
    print(f"study: {len(stages)} stages, about {sum(progress.estimate(k, u) for _, k, u, _ in stages) / 60:.0f} min "
          f"on 2 CPU cores", file=sys.stderr, flush=True)
    if args.dry_run:
        for name, kind, units, _ in stages:
            print(f"  {name}: about {progress.estimate(kind, units) / 60:.1f} min", file=sys.stderr)
        return None
    run_side_by_side(stages, args.jobs, progress)
    for name, kind, units, fn in stages:
        progress.run(name, kind, units, fn)
    minutes = progress.minutes()

    num = collect(args)
    meta = {"seeds": args.seeds, "petct_seeds": args.petct_seeds, "commit": commit, "minutes": minutes,
            "model": configuration(out / f"seed{args.seeds[0]}" / "mri" / "pretrain" / "last.pt"),
            "config": dict(vars(args))}
    seg = aggregate(num["seg"], ("labelled", "init"), 1)
    tr = aggregate(num["transfer"], ("method",), 2)
    pet = aggregate(num["petct"], ("pre-training", "ID"), 1)
    ids = aggregate(num["id"], ("data", "network"), 3)
    flat = [{"run": r["run"], "curve": r["curve"], "seed": r["seed"],
             "last-20% gain": "-" if not np.isfinite(r["gain"]) else f"{r['gain']:+.3f}",
             "flattened": "yes" if r["flat"] else "no"} for r in num["flat"]]
    tables = [
        ("MRI segmentation on the test persons, Dice (%): tuned from ours and from scratch, every training person "
         "labelled (all) and a few (Table 11 format)", seg),
        ("MRI transfer on the test persons, mean over the 12 source -> target pairs (Table 10 format; identity: the "
         "source itself as the prediction)", tr),
        ("PET/CT lesion segmentation on the test persons after each pre-training preset and from scratch "
         "(Tables 7 and 8 format)", pet),
        ("The mechanism on the test persons: person identification from X_h' (nearest neighbour over modalities, "
         "cosine; centred: after removing the grand mean), the mean cosine between two modalities of the same and "
         "of other persons, the between- and within-person fractions of the spread of X_h' and the between-person "
         "fraction of z (metrics.variance_decomposition), centred identification from z (the encoder's output) "
         "and z' (the prior branch's), the prior attention's entropy over its maximum", ids),
    ]
    claim_lines = claims(num, args)
    png = learning_curves(args, out / "learning_curves.png") if args.part == "all" else None
    md = render(args, meta, tables, claim_lines, flat, minutes)
    write_text(out / "STUDY.md", md)
    write_json(out / "STUDY.json", {"meta": meta, "tables": {t: rows for t, rows in tables}, "per_seed": num,
                                    "claims": claim_lines})
    print("\n" + md)
    write_sections(args, meta, md, claim_lines, png, minutes)
    return {"tables": tables, "claims": claim_lines, "per_seed": num}


def write_sections(args, meta, md, claim_lines, png, minutes):
    """The results into the --results file (the learning curves beside it), the claims into the
    --readme file with a link to the results."""
    if args.results:
        results = Path(args.results)
        if png is not None:
            with atomic(results.parent / figure_name(args.section)) as tmp:
                shutil.copyfile(png, tmp)
        print(f"{replace_section(results, args.section, md)}: {args.section} section replaced", file=sys.stderr)
    if args.readme:
        where = ""
        if args.results:
            link = Path(os.path.relpath(Path(args.results).resolve(), Path(args.readme).resolve().parent)).as_posix()
            where = f" Tables, learning curves and budgets: [{link}]({link})."
        text = "\n".join([made_by(args, meta, minutes) + where, "", *claim_lines])
        print(f"{replace_section(args.readme, args.section + '-claims', text)}: {args.section} claims replaced",
              file=sys.stderr)


if __name__ == "__main__":
    main()
