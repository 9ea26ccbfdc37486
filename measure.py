"""What the benchmarks (bench.py, bench_data.py) measure with: median wall times, peak memory in
a fresh process, the FLOPs of a pre-training and a tuning step, and their Markdown tables."""
import math
import multiprocessing as mp
import statistics
import time

import torch


def median_times(fns, repeats=5, warmup=1):
    """{name: median wall time} of several functions run in turn (ours, peer, ours, peer, ...),
    so that a change in machine load during the benchmark hits both sides alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(median_time(fn, 1, warmup=0))
    return {name: statistics.median(t) for name, t in times.items()}


def median_time(fn, repeats=5, warmup=1):
    """Median wall time of fn() in seconds (CUDA synchronised when on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak():
    """Resets this process's memory high-water mark; returns the resident size it starts from.
    Linux keeps ru_maxrss across exec, so a child would inherit the parent's peak; the
    process's own high-water mark (VmHWM) is read after resetting it instead."""
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return base


def peak_since(base):
    """Peak memory (MiB) added since reset_peak returned base (CUDA: peak allocated)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return (_rss_kib("VmHWM") - base) / 1024


def _peak_child(conn, fn, args):
    base = reset_peak()
    fn(*args)
    conn.send(peak_since(base))


def in_fresh_process(target, *args):
    """What target(conn, *args) sends on conn, run in a fresh (spawned) process; target must be
    a module-level function (picklable)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(child, *args))
    p.start()
    value = parent.recv()
    p.join()
    return value


def peak_memory_mb(fn, *args):
    """Peak memory (MiB) that fn(*args) adds, measured in a fresh process.
    fn must be a module-level function (picklable)."""
    return in_fresh_process(_peak_child, fn, args)


def print_table(title, rows, columns):
    """rows: list of dicts; columns: list of keys. Prints a Markdown table."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        print("| " + " | ".join(cells) + " |")


# bf16 dense tensor-core peak (TFLOP/s) of the GPUs a full-size run would use (H100 SXM, H200)
GPU_PEAK = {"H100 / H200 (SXM)": 989.0}


def pretrain_step_flops(fs, roi):
    """FLOPs of one pre-training step (one person, 4 modalities: the input with gradient, forward
    and backward; the two views without), counted by torch.utils.flop_counter on the meta
    device (no memory, no compute); the heads and losses are negligible beside the network."""
    from torch.utils.flop_counter import FlopCounterMode

    import model

    meta = torch.device("meta")
    grid = math.prod(r // 32 for r in roi)
    net = model.PersonalizedSwinUNETR(4, 4, feature_size=fs, roi=roi, prior_heads=3 if grid % 3 == 0 else 2,
                                      attn_backend="naive").to(meta)
    u = torch.randn(1, 4, *roi, device=meta)
    with FlopCounterMode(display=False) as counter:
        for _ in range(4):
            z, skips = net.encode(u)
            with torch.no_grad():
                net.embed(net.encode(torch.cat([u, u]))[0])
            y = net.decode(net.personalize(z), skips, u)
            (y.square().mean() + net.embed(z).sum() + net.equivariance_logits(z).sum()).backward()
    return counter.get_total_flops()


def tuning_step_flops(fs, roi, nm=4):
    """FLOPs of one tuning step of Algorithm 2 (segmentation, batch 1): each of nm modalities
    encoded and decoded alone and the fused path decoded, forward and backward, on the meta
    device (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    import inference as I
    import model

    meta = torch.device("meta")
    grid = math.prod(r // 32 for r in roi)
    net = model.PersonalizedSwinUNETR(nm, 3, feature_size=fs, roi=roi, prior_heads=3 if grid % 3 == 0 else 2,
                                      attn_backend="naive").to(meta)
    x = torch.randn(1, nm, *roi, device=meta)
    with FlopCounterMode(display=False) as counter:
        feats, total = [], 0.0
        for i in range(nm):
            u = I.single(x, i)
            xh, skips = I.encode(net, u)
            feats.append((xh, skips, u))
            total = total + net.decode(xh, skips, u).square().mean()
        total = total + net.decode(*I.fuse(feats, torch.ones(nm, 1, device=meta))).square().mean()
        total.backward()
    return counter.get_total_flops()
