"""Writing and reading the project's files: every file appears whole or not at all.

    atomic(*paths)        temporary paths beside the targets, renamed onto them (after fsync)
                          only when the block succeeds: text, JSON, NIfTI, PNG, checkpoints
    atomic_dir(path)      the same for a folder built in one go (a cache entry, the demo data)
    write_text, write_json
                          JSON never holds NaN (null) or infinities ("inf" / "-inf")
    replace_section       a command's own section of a Markdown file, between its markers
    save_checkpoint, read_checkpoint
                          torch.save through atomic(); torch.load with weights_only=True
    staging(out)          a hidden folder beside `out` whose files move into `out` only when the
                          whole job succeeded (a failed run leaves `out` as it was)
    locked(path)          an exclusive lock on a file, shared by processes and threads
    git_commit            the commit of the code, recorded with results
"""
import fcntl
import glob
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _temporary(path):
    """A hidden name beside path, unique per process and thread, ending like path (nibabel and
    matplotlib choose the format by the ending)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp{''.join(path.suffixes[-2:])}")


@contextmanager
def atomic(*paths):
    """Yields one temporary path per target path (a single path for a single target); when the
    block ends without an error each is flushed to disk and renamed onto its target, all of
    them only after all were written. Whatever happens, no temporary file is left behind."""
    paths = [Path(p) for p in paths]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    tmps = [_temporary(p) for p in paths]
    try:
        yield tmps[0] if len(tmps) == 1 else tmps
        for tmp in tmps:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, p in zip(tmps, paths):
            os.replace(tmp, p)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path):
    """Yields an empty hidden folder beside `path` to fill; when the block succeeds it takes the
    place of `path` (a folder already there is moved aside first, so readers holding its files
    open keep them). Callers hold a lock on `path`: folders left by builders that died are
    removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = glob.escape(path.name)
    for left in [*path.parent.glob(f".{name}.*.tmp"), *path.parent.glob(f".{name}.*.old")]:
        shutil.rmtree(left, ignore_errors=True)
    me = f".{path.name}.{os.getpid()}.{threading.get_ident()}"
    tmp, trash = path.with_name(me + ".tmp"), path.with_name(me + ".old")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def locked(path, wait=True):
    """Exclusive lock shared by processes (DDP ranks, DataLoader workers, other nodes: Linux
    takes flock on NFS as a POSIX lock the server arbitrates) and threads. Yields True once held;
    with wait=False, yields False at once when another holder has it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_text(path, text):
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def section_markers(name):
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(path, name, text):
    """Replaces what stands between `<!-- name:begin -->` and `<!-- name:end -->` in a Markdown
    file: the numbers a command measures live in its own section, so a rerun refreshes them and
    nothing else in the file changes."""
    path = Path(path)
    begin, end = section_markers(name)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old.count(begin) != 1 or old.count(end) != 1 or old.index(begin) > old.index(end):
        raise SystemExit(f"{path}: expected one '{begin}' ... '{end}' section to replace")
    head, rest = old.split(begin, 1)
    write_text(path, f"{head}{begin}\n{text.strip()}\n{end}{rest.split(end, 1)[1]}")
    return path


def json_value(v):
    """v with NaN -> None, +-inf -> "inf" / "-inf", numpy and one-element torch values -> Python
    numbers, tuples -> lists, paths -> strings, recursively (so json.dumps never writes NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return json_value(v.item())
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return json_value(v.item())
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def json_text(obj, indent=1):
    return json.dumps(json_value(obj), indent=indent, allow_nan=False) + "\n"


def write_json(path, obj, indent=1):
    return write_text(path, json_text(obj, indent))


def save_checkpoint(path, state):
    """torch.save through atomic(): a crash never leaves a truncated checkpoint behind."""
    with atomic(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def read_checkpoint(path):
    """torch.load(path) with weights-only unpickling, on the CPU. Raises FileNotFoundError or
    ValueError with a one-line message naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint not found") from None
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types
        what = " ".join(str(e).split())[:300]
        raise ValueError(f"{path}: unreadable weights-only checkpoint ({type(e).__name__}: {what})") from None


@contextmanager
def staging(out):
    """Yields a hidden folder beside `out`; when the block succeeds every file in it moves into
    `out` (replacing older ones of the same name), otherwise it is deleted with its content."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        for f in sorted(p for p in stage.rglob("*") if p.is_file()):
            dest = out / f.relative_to(stage)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def git_commit():
    """Commit of the working tree (with "+dirty" if it has changes), or "unknown"."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
