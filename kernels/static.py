"""The kernels compiled for real GPUs without one: Triton's own compiler builds each kernel for
sm_80 (A100) and sm_90 (H100 / H200) on the CPU (ptxas ships in the Triton wheel), and the
cubin's resource usage (cuobjdump --dump-resource-usage) gives registers per thread, spill
(stack) bytes and shared memory, at every configuration the model launches.

    python -m kernels.static [--json]            the table (Markdown) or its rows (JSON)

Budgets (per thread, 4-warp programs): no spills anywhere; the forward and dq kernels at most
128 registers (four programs per SM), the others at most 168; EXCEPTIONS says where and why not.
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16", "fp32")
HEAD_DIMS = (8, 16, 32)  # padded to 16, 16, 32
# (HAS_BIAS, HAS_REGION): window attention with and without shift regions; the prior attention
CASES = ((True, False), (True, True), (False, False))
BUDGET = {"fwd": 128, "dq": 128, "delta": 168, "dkdv": 168, "dbias": 168}
# Over budget on purpose (kernel, dtype, head dim -> registers allowed): the fp32 dK/dV kernel at
# head dim 32 needs 181 registers at the smallest tiles (two 4-warp programs per SM instead of
# three); fp32 is the exact path of the tests, the model runs bf16 on GPUs.
EXCEPTIONS = {("dkdv", "fp32", 32): 184}
_FP32 = ("Bias", "Lse", "Delta", "DBias")  # pointer arguments by element type
_DATA = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")


def _tools():
    import triton.backends.nvidia as nvidia
    return {name: os.path.join(os.path.dirname(nvidia.__file__), "bin", name) for name in ("ptxas", "cuobjdump")}


def available():
    """Whether this Triton wheel can build cubins here (it ships ptxas and cuobjdump)."""
    try:
        return all(os.access(p, os.X_OK) for p in _tools().values())
    except ImportError:
        return False


def _signature(fn, dtype, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _FP32:
            sig[name] = "*fp32"
        elif name == "Region":
            sig[name] = "*i32"
        elif name in _DATA:
            sig[name] = f"*{dtype}"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def kernel_usage(kernel, arch, dtype, hd, bias, region):
    """Registers, spill bytes and shared memory of one kernel ("fwd", "delta", "dkdv", "dq",
    "dbias") built for sm_<arch> with the configuration the launchers use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import window_attention as W

    fn = W.KERNELS[kernel]
    consts = W.launch_meta(kernel, hd, dtype == "fp32", bias, region)
    warps = consts.pop("num_warps")
    extra = {"SHARED_KV": not bias, "ATOMIC": False}  # the prior attention shares keys over the batch
    consts.update({k: v for k, v in extra.items() if k in fn.arg_names})
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, consts), constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([_tools()["cuobjdump"], "--dump-resource-usage", cubin], capture_output=True,
                              text=True, check=True).stdout
    regs, stack = (int(re.search(rf"{k}:(\d+)", text).group(1)) for k in ("REG", "STACK"))
    return {"kernel": kernel, "arch": f"sm_{arch}", "dtype": dtype, "head_dim": hd, "bias": bias, "region": region,
            "block_m": consts.get("BLOCK_M"), "block_n": consts.get("BLOCK_N"), "warps": warps,
            "registers": regs, "spill_bytes": stack, "shared_bytes": int(compiled.metadata.shared),
            "budget": BUDGET[kernel]}


def configurations():
    """Every (kernel, arch, dtype, head dim, bias, region) the model can launch."""
    out = []
    for arch, dtype, hd, (bias, region) in itertools.product(ARCHS, DTYPES, HEAD_DIMS, CASES):
        for kernel in ("fwd", "delta", "dkdv", "dq") + (("dbias",) if bias else ()):
            out.append((kernel, arch, dtype, hd, bias, region))
    return out


def _one(args):
    return kernel_usage(*args)


def table(jobs=2):
    """kernel_usage of every configuration, compiled in `jobs` processes (run without
    TRITON_INTERPRET: the compiler needs the real JIT functions)."""
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_one, configurations(), chunksize=8))


# per SM on sm_80 / sm_90: 64K 32-bit registers, 64 resident warps, 32 resident programs and the
# shared memory a program may use (164 / 228 KiB)
SM_SHARED = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}


def programs_per_sm(row):
    """Programs of this kernel that fit one SM at once: registers (allocated per warp in units of
    256), warps and shared memory, whichever runs out first."""
    per_warp = -(-row["registers"] * 32 // 256) * 256
    by_regs = 65536 // (per_warp * row["warps"])
    by_smem = SM_SHARED[row["arch"]] // row["shared_bytes"] if row["shared_bytes"] else 32
    return min(by_regs, 64 // row["warps"], by_smem, 32)


def violations(rows):
    """Rows that spill or use more registers than their budget (or their exception) allows."""
    def allowed(r):
        return EXCEPTIONS.get((r["kernel"], r["dtype"], r["head_dim"]), r["budget"])
    return [r for r in rows if r["spill_bytes"] > 0 or r["registers"] > allowed(r)]


def markdown(rows):
    """Worst case over dtypes, bias and regions per kernel, head dim and arch."""
    keys = sorted({(r["kernel"], r["head_dim"], r["arch"]) for r in rows},
                  key=lambda k: (list(BUDGET).index(k[0]), k[1], k[2]))
    lines = ["| kernel | head dim | arch | BLOCK_M x BLOCK_N, warps | registers (max) | spill bytes (max) | "
             "shared memory (max, bytes) | programs per SM (min) | budget |", "|---|---|---|---|---|---|---|---|---|"]
    for kernel, hd, arch in keys:
        sel = [r for r in rows if (r["kernel"], r["head_dim"], r["arch"]) == (kernel, hd, arch)]
        r0 = sel[0]
        tile = f"{r0['block_m']} x {r0['block_n']}" if r0["block_n"] else f"{r0['block_m']} rows"
        lines.append(f"| {kernel} | {hd} | {arch} | {tile}, {r0['warps']} | "
                     f"{max(r['registers'] for r in sel)} | {max(r['spill_bytes'] for r in sel)} | "
                     f"{max(r['shared_bytes'] for r in sel)} | {min(programs_per_sm(r) for r in sel)} | "
                     f"{BUDGET[kernel]} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print every row as JSON")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if not available():
        raise SystemExit("this Triton wheel has no ptxas / cuobjdump: cannot build cubins here")
    rows = table(args.jobs)
    print(json.dumps(rows) if args.json else markdown(rows))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
