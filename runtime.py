"""What the scripts share: config dataclass -> argparse, and for training torchrun set-up, the
step sampler, checkpoints with every rank's RNG state, the JSONL log and loss-curve figure, and
the non-finite-loss guard whose decision all ranks agree on."""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
import layouts
import sampling
from files import atomic, json_text, read_checkpoint, save_checkpoint, write_text


# ---- configuration ---------------------------------------------------------------------------


def opt(default, help, choices=None, required=False):
    """A config field with its --help text (and the values it may take; required: no default on
    the command line)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "required": required})


@dataclasses.dataclass
class TrainConfig:
    """Options both training scripts share (each script's Config adds its own)."""
    data: str = opt("demo", "dataset folder, datalist JSON, 'demo' (BraTS-layout MRI) or 'demo-petct'")
    labels: str = opt("", "label convention overriding the layout's (brats2024: BraTS 2023 file names, 4 = resection "
                          "cavity, kept out of the tumour regions)")
    val_fraction: float = opt(0.2, "fraction of cases held out for validation (a split file in --out, or the "
                                   "stage-1 checkpoint's split when tuning on its cases, is kept)")
    test_fraction: float = opt(0.2, "fraction of cases held out for testing")
    w_fg: float = opt(10.0, "foreground weight inside L_decom (pre-training; transfer tuning)")
    max_steps: int = opt(1000, "optimizer steps (one per person-batch)")
    batch_size: int = opt(1, "persons per rank per step")
    lr: float = opt(2e-4, "AdamW learning rate")
    weight_decay: float = opt(1e-5, "AdamW weight decay")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    prior_lr: float = opt(10.0, "learning rate of the prior O relative to --lr (O has no weight decay)")
    warmup: int = opt(0, "linear warm-up steps")
    cosine: bool = opt(False, "cosine decay to 0 at --max-steps after the warm-up")
    clip: float = opt(1.0, "gradient norm clipping (0 = off)")
    seed: int = opt(0, "seed of the split, crops, transforms and initialisation")
    resume: str = opt("", "'auto' continues from OUT/last.pt when present; or a checkpoint path")
    save_every: int = opt(100, "write OUT/last.pt every N steps (and at the end)")
    workers: int = opt(2, "DataLoader workers per rank")
    max_nonfinite: int = opt(5, "stop after this many non-finite steps in a row")
    attn_backend: str = opt("auto", "attention: naive | sdpa | triton | auto (triton on CUDA, else sdpa)")
    checkpointing: bool = opt(False, "activation checkpointing (less memory; each block's forward runs again in the backward)")
    amp: bool = opt(True, "bf16 autocast on GPU (CPU always runs fp32)")
    cache: str = opt("", "preprocessed-data cache folder (default: .cache/data beside data.py)")
    device: str = opt("auto", "auto | cuda | cpu")



class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_config(cls, argv=None, description=None, usage=None, epilog=None):
    """argparse built from a config dataclass: every field is a --flag (underscores -> dashes);
    field metadata (opt) gives its help, choices and whether it is required."""
    ap = argparse.ArgumentParser(description=description, usage=usage, epilog=epilog, formatter_class=_Formatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kw = {"default": default, "help": f.metadata.get("help", " ")}
        if f.metadata.get("required"):
            kw["required"] = True
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            ap.add_argument(flag, type=type(default) if default is not None else str,
                            choices=f.metadata.get("choices"), **kw)
    return cls(**vars(ap.parse_args(argv)))


def roi_tuple(roi):
    """'96' or '96,96,64' -> (96, 96, 96) / (96, 96, 64); every side divisible by 32."""
    sides = tuple(int(s) for s in str(roi).split(","))
    sides = sides * 3 if len(sides) == 1 else sides
    if len(sides) != 3 or any(s <= 0 or s % 32 for s in sides):
        fix = ",".join(str(32 * max(1, round(s / 32))) for s in sides)
        raise SystemExit(f"--roi {roi}: every side must be a positive multiple of 32 (e.g. --roi {fix})")
    return sides


# ---- distributed -----------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """One process (`python script.py`) or torchrun (RANK / WORLD_SIZE / LOCAL_RANK from the
    environment): nccl on GPU, gloo on CPU."""
    want_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", device_id=dev if want_cuda else None)
    return Dist(rank, world, local, dev)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(value, d):
    """max of a float over ranks (used so that every rank takes the same decision)."""
    if d.world == 1:
        return float(value)
    t = torch.tensor([float(value)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def mean_over_ranks(values, d):
    """[float, {name: float}] averaged over ranks (for logging the global batch)."""
    if d.world == 1:
        return values
    total, terms = values
    keys = sorted(terms)
    t = torch.tensor([total] + [terms[k] for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    t = (t / d.world).tolist()
    return t[0], dict(zip(keys, t[1:]))


def all_gather_objects(obj, d):
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d):
    if d.world > 1:
        dist.barrier()


class StepSampler(torch.utils.data.Sampler):
    """This rank's (epoch, index) pairs from step `start` to `steps`, `batch` per rank per step.

    Global sample g = step * world * batch + rank * batch + j walks through a seeded permutation
    of the n items per epoch, so a resumed run sees exactly the samples the uninterrupted run
    would have seen, whatever the number of workers. shared: (epoch, index, step) triples, the
    samples of a step one group of EpochIndexed (cropped at the same relative position)."""

    def __init__(self, n, batch, steps, start=0, seed=0, rank=0, world=1, shared=False):
        self.n, self.batch, self.steps, self.start = n, batch, steps, start
        self.seed, self.rank, self.world, self.shared = seed, rank, world, shared
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __len__(self):
        return max(0, self.steps - self.start) * self.batch

    def __iter__(self):
        for step in range(self.start, self.steps):
            for j in range(self.batch):
                g = (step * self.world + self.rank) * self.batch + j
                epoch = g // self.n
                yield (epoch, int(self._perm(epoch)[g % self.n])) + ((step,) if self.shared else ())


class EpochIndexed(torch.utils.data.Dataset):
    """Wraps a dataset with set_epoch(e) so that items are addressed by (epoch, index) pairs, or
    by (epoch, index, group) triples: ds.crop(index, group)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, index, *group = key
        self.ds.set_epoch(epoch)
        return self.ds.crop(index, *group) if group else self.ds[index]


# ---- reproducibility and checkpoints ---------------------------------------------------------


def seed_everything(seed, rank=0):
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def rng_state():
    """This process's RNG states as weights-only-loadable objects (tensors, ints, strings)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))


def load_checkpoint(path):
    """files.read_checkpoint, with its one-line error as the command's exit message."""
    try:
        return read_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


def average_gradients(model, d):
    """Mean of every gradient over the data-parallel ranks, in one flat all-reduce after all
    of a step's backward passes (parameters without a gradient this step count as zero, so
    optional branches never desynchronise ranks)."""
    if d.world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= d.world
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()


def broadcast_parameters(model, d):
    """Every rank starts from rank 0's weights."""
    if d.world > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


# ---- learning rate ---------------------------------------------------------------------------


def lr_lambda(warmup, total, cosine):
    """Multiplier of the base learning rate at a step: linear warm-up, then constant or cosine."""
    def f(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


# ---- logging and guards ----------------------------------------------------------------------


class JsonlLog:
    """Appends one JSON object per line (rank 0 only). On resume, entries past the resumed step
    are dropped so the log reads as one uninterrupted run."""

    def __init__(self, path, enabled=True, resume_step=None):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                write_text(self.path, "")
            elif self.path.exists():
                keep = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", -1) <= resume_step]
                write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, **entry):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json_text(entry, indent=None))


def read_jsonl(path):
    """The entries of a JSONL log ([] when the file does not exist)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_log(jsonl, png, keys, title):
    """One panel per logged term against the step (the reference curves users ask for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not rows or not keys:
        return None
    cols = min(len(keys), 6)
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return png


class NonFiniteGuard:
    """Skips a step when any rank saw a non-finite loss or gradient (decision all-reduced so no
    rank waits forever in a collective), stops after `limit` skips in a row."""

    def __init__(self, limit, d):
        self.limit, self.d, self.in_a_row, self.total = limit, d, 0, 0

    def should_skip(self, loss, model):
        bad = not math.isfinite(float(loss))
        if not bad:
            for p in model.parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    bad = True
                    break
        bad = all_reduce_max(float(bad), self.d) > 0
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.total += int(bad)
        if self.in_a_row >= self.limit:
            raise SystemExit(f"stopping: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                             f"(lower --lr, check the data with `python data.py check`, or enable gradient clipping)")
        return bad


def make_optimizer(net, cfg):
    """AdamW over the trainable parameters (lr, weight decay, eps of cfg) in two groups: the
    network, and the prior O alone with lr x cfg.prior_lr and no weight decay (a unit-scale
    tensor that Adam moves by about lr per entry and step would otherwise change, relative to
    itself, tens of times slower than the weights around it). Returns (params, optimizer);
    group 0 is the network's."""
    prior = getattr(net, "prior", None)
    params = [p for p in net.parameters() if p.requires_grad]
    rest = [p for p in params if p is not prior]
    groups = [{"params": rest}]
    if isinstance(prior, torch.nn.Parameter) and prior.requires_grad:
        groups.append({"params": [prior], "lr": cfg.lr * cfg.prior_lr, "weight_decay": 0.0})
    return params, torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def optimizer_step(net, params, optim, sched, guard, clip, d, loss, terms, watch=()):
    """The end of every training step of both scripts: average the gradients over ranks, skip
    the step when any rank saw a non-finite value, else clip and step; advance the scheduler.
    Returns (loss, terms, skipped, lr, norms) with loss and terms averaged over ranks for the
    log; norms: grad_norm, the global gradient norm before clipping, and with `watch` (a subset
    of params) grad_share, that subset's norm over the global one."""
    average_gradients(net, d)
    loss, terms = mean_over_ranks([loss, terms], d)  # the log shows the global batch
    skipped = guard.should_skip(loss, net)
    norms = {}
    if skipped:
        optim.zero_grad(set_to_none=True)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        norms["grad_norm"] = float(total)
        if watch:
            part = torch.nn.utils.get_total_norm([p.grad for p in watch if p.grad is not None])
            norms["grad_share"] = float(part / total.clamp_min(1e-30))
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip, total)
        optim.step()
    lr = optim.param_groups[0]["lr"]
    sched.step()
    return loss, terms, skipped, lr, norms


def log_step(jlog, bar, step, loss, terms, lr, wait, timer, skipped, extra=None):
    """A finished step: its line of log.jsonl (loss, terms, learning rate, `extra` diagnostics,
    time waiting for data and for the whole step) and the progress bar's numbers."""
    jlog.write(step=step, loss=loss, **terms, lr=lr, **(extra or {}), data_wait_s=round(wait, 4),
               step_s=round(timer.lap() + wait, 4), skipped=skipped)
    bar.update(1)
    bar.set_postfix({"loss": f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in terms.items()}})


def autocast(d, enabled=True):
    """bf16 autocast on GPU, plain fp32 on CPU."""
    if d.device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def log(msg, d=None):
    if d is None or d.main:
        print(msg, file=sys.stderr, flush=True)


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self):
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


# ---- pieces of the training loop both scripts use --------------------------------------------


def train_loader(spec, ids, roi, batch, steps, start, seed, d, workers=2, fg_fraction=0.5, cache_dir=None,
                 same_position=False):
    """Random roi crops of the cases `ids`, this rank's share of each global batch, from step
    `start` (resume) to `steps`; same_position: every crop of a global batch at the same relative
    position (CropDataset.crop). The cache is built first, split over ranks, then shared."""
    cases = [spec.case(i) for i in ids]
    data.prepare(layouts.DatasetSpec(spec.root, spec.layout, spec.modalities, cases, spec.label_kind,
                                  spec.label_values, spec.regions), cache_dir, d.rank, d.world)
    barrier(d)
    ds = sampling.CropDataset(cases, roi, fg_fraction=fg_fraction, seed=seed, spec=spec, cache_dir=cache_dir)
    sampler = StepSampler(len(ds), batch, steps, start, seed, d.rank, d.world, shared=same_position)
    return torch.utils.data.DataLoader(EpochIndexed(ds), batch_size=batch, sampler=sampler, num_workers=workers,
                                       collate_fn=sampling.collate, persistent_workers=workers > 0,
                                       pin_memory=d.device.type == "cuda")


def save_state(path, model, opt, sched, step, cfg, d, **extra):
    """Everything a run needs to continue exactly (model, optimizer, scheduler, step, the RNG
    state of every rank, config) plus `extra` (architecture, data contract, ...)."""
    states = all_gather_objects(rng_state(), d)
    if d.main:
        save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "step": step, "rng": states,
                               "config": dataclasses.asdict(cfg), **extra})
    barrier(d)


def restore_state(path, model, opt, sched, d):
    """Loads a save_state checkpoint into model / optimizer / scheduler; returns it."""
    ck = load_checkpoint(path)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    if len(ck["rng"]) != d.world:
        log(f"{path}: saved with {len(ck['rng'])} ranks, resuming with {d.world}: RNG streams restart", d)
    else:
        set_rng_state(ck["rng"][d.rank])
    return ck


def resume_path(out, resume):
    """'auto': out/last.pt if it exists; a path: that file; '': start fresh."""
    if resume == "auto":
        p = Path(out) / "last.pt"
        return p if p.exists() else None
    return Path(resume) if resume else None
