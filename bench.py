"""Benchmarks: our code and its peer (MONAI, scikit-image, PyTorch SDPA) in the same run.

    python bench.py model | data | metrics | pretrain | kernels [--quick]

Every benchmark prints a table with both sides and their ratio (ours / peer). Times are the
median of several runs after warm-up; peak memory is measured in a fresh subprocess per side
(peak RSS on CPU, torch.cuda.max_memory_allocated on GPU), so the two sides cannot pollute
each other. Timed tests are never part of the test suite: numbers come from here only.
"""
import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

import torch


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


def _peak_child(conn, fn, args):
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fn(*args)
    if torch.cuda.is_available():
        conn.send(torch.cuda.max_memory_allocated() / 2**20)
    else:
        conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def peak_memory_mb(fn, *args):
    """Peak memory (MiB) that fn(*args) adds, measured in a fresh process.
    fn must be a module-level function (picklable)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_peak_child, args=(child, fn, args))
    p.start()
    value = parent.recv()
    p.join()
    return value


def print_table(title, rows, columns):
    """rows: list of dicts; columns: list of keys. Prints a Markdown table."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        print("| " + " | ".join(cells) + " |")


# ---- benchmarks (bench_<name>(args) functions) ----

# ---- end of benchmarks ----


def main():
    names = sorted(k[len("bench_"):] for k in globals() if k.startswith("bench_"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=names)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, threads {torch.get_num_threads()}")
    globals()["bench_" + args.what](args)


if __name__ == "__main__":
    main()
