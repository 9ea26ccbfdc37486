"""The paper's tables (Markdown, CSV, JSON) and figures (PNG), from the rows metrics.py scores.

    tables   transfer_matrix_table (Table 10), transfer_summary_table (Table 9),
             missing_modality_table (Table 11), autopet_table (Table 8), lesion_table (lesion-wise
             BraTS 2024-2025 numbers), identification_table, mechanism_table,
             write_table, markdown
    figures  figure_transfer (Figures 8, 10-12), figure_segmentation, figure_embedding (PCA of
             X_h', Figure 9), figure_prediction (predict.py's preview), figure_curves (the
             study's learning curves)

Figures draw on matplotlib's Agg canvas directly: no pyplot, no global backend change.
"""
import csv
import io
import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from files import atomic, git_commit, json_text
from metrics import REGIONS, as_tensor, autopet_summary, nanmean, std

# ---------------------------------------------------------------------------------------------
# Tables

MODALITY_ORDER = ("t1", "t1ce", "t2", "flair", "ct", "pet")


def _ordered(names):
    """Unique names, known modalities first in MODALITY_ORDER, the rest in order of appearance."""
    seen = list(dict.fromkeys(names))
    known = [m for m in MODALITY_ORDER if m in seen]
    return known + [m for m in seen if m not in known]


def display_name(name):
    """How tables and figures name a modality (T1, T1ce, T2, Flair, CT, PET)."""
    return {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "Flair", "ct": "CT", "pet": "PET"}.get(name, name)


def transfer_matrix_table(results):
    """Table 10: per source a "mean" and a "std" row, per target PSNR, NMSE and SSIM over cases.
    results: dicts with source, target, psnr, nmse, ssim (one per case and pair)."""
    if not results:
        raise ValueError("transfer_matrix_table: no results")
    sources = _ordered(r["source"] for r in results)
    targets = _ordered(r["target"] for r in results)
    rows = []
    for s in sources:
        for stat, fn in (("mean", nanmean), ("std", std)):
            row = {"source": display_name(s), "stat": stat}
            for t in targets:
                sel = [r for r in results if r["source"] == s and r["target"] == t]
                for k in ("psnr", "nmse", "ssim"):
                    row[f"{display_name(t)} {k.upper()}"] = fn(r[k] for r in sel) if sel else math.nan
            rows.append(row)
    return rows


def transfer_summary_table(results, pairs=(("t1", "t2"), ("t2", "flair"))):
    """Table 9: one row per method (results' "method", default "ours"), for each source -> target
    pair the mean and std of PSNR, NMSE and SSIM (Markdown shows them as mean ± std)."""
    if not results:
        raise ValueError("transfer_summary_table: no results")
    rows = []
    for method in dict.fromkeys(r.get("method", "ours") for r in results):
        row = {"method": method}
        for s, t in pairs:
            sel = [r for r in results if r.get("method", "ours") == method and r["source"] == s and r["target"] == t]
            for k in ("psnr", "nmse", "ssim"):
                col = f"{display_name(s)}->{display_name(t)} {k.upper()}"
                row[col] = nanmean(r[k] for r in sel) if sel else math.nan
                row[f"{col} std"] = std(r[k] for r in sel) if sel else math.nan
        rows.append(row)
    return rows


def missing_modality_table(results, modalities=None, regions=REGIONS):
    """Table 11: one row per subset of available modalities (15 for four MRI modalities, 3 for
    CT/PET; smallest subsets first) with "x" under each present modality, the mean Dice (%) of
    each region (keys of the results, WT/TC/ET by default) and their average, the case count
    and the count of (case, region) pairs with an empty truth; then the mean over the subset
    rows. results: dicts from seg_case with a "subset" (tuple of names, or "t1+t2")."""
    if not results:
        raise ValueError("missing_modality_table: no results")

    def key(r):
        s = r["subset"]
        return tuple(s.split("+")) if isinstance(s, str) else tuple(s)
    mods = list(modalities) if modalities is not None else _ordered(m for r in results for m in key(r))
    unknown = {m for r in results for m in key(r)} - set(mods)
    if unknown:
        raise ValueError(f"missing_modality_table: subsets use modalities {sorted(unknown)} not in {mods}")
    subsets = sorted({frozenset(key(r)) for r in results}, key=lambda s: (len(s), sorted(mods.index(m) for m in s)))
    rows = []
    for sub in subsets:
        sel = [r for r in results if frozenset(key(r)) == sub]
        row = {"subset": "+".join(display_name(m) for m in mods if m in sub)}
        row.update({display_name(m): ("x" if m in sub else "") for m in mods})
        for k in regions:
            row[k] = 100.0 * nanmean(r[k] for r in sel)
        row["mean"] = nanmean(row[k] for k in regions)
        row["n"] = len(sel)
        row["empty truth"] = sum(len(r.get("empty_truth", [])) for r in sel)
        rows.append(row)
    mean = {"subset": "mean", **{display_name(m): "" for m in mods}}
    for k in (*regions, "mean"):
        mean[k] = nanmean(r[k] for r in rows)
    mean["n"] = sum(r["n"] for r in rows)
    mean["empty truth"] = sum(r["empty truth"] for r in rows)
    return rows + [mean]


def lesion_table(summaries, regions):
    """Lesion-wise numbers (the BraTS 2024-2025 rules, metrics.lesion_metrics): one row per
    subset of the inputs, for each region the lesion-wise Dice (%), HD95 (mm, an infinite one
    counted as metrics.HD_PENALTY) and detection F1 (%), means over cases. summaries: subset
    (tuple of names) -> metrics.lesion_summary of its cases."""
    if not summaries:
        raise ValueError("lesion_table: no results")
    rows = []
    for sub, s in summaries.items():
        row = {"subset": "+".join(display_name(m) for m in sub)}
        for k in regions:
            name = k.upper() if k.upper() in REGIONS else display_name(k)
            row.update({f"{name} Dice": 100 * s[k]["dice"], f"{name} HD95": s[k]["hd95"],
                        f"{name} F1": 100 * s[k]["f1"]})
        row["n"] = s[regions[0]]["cases"]
        rows.append(row)
    return rows


def autopet_table(results):
    """Table 8: one row per method (results' "method", default "ours") from autopet_summary:
    Dice, Dice-, TPR, TNR, FNR, FPR in %, FP and FN volume in mL, case counts."""
    if not results:
        raise ValueError("autopet_table: no results")
    rows = []
    for method in dict.fromkeys(r.get("method", "ours") for r in results):
        s = autopet_summary([r for r in results if r.get("method", "ours") == method])
        rows.append({"method": method, "Dice": 100 * s["dice"], "Dice-": 100 * s["dice_minus"],
                     "TPR": 100 * s["tpr"], "TNR": 100 * s["tnr"], "FNR": 100 * s["fnr"], "FPR": 100 * s["fpr"],
                     "FP vol (mL)": s["fp_volume_ml"], "FN vol (mL)": s["fn_volume_ml"],
                     "cases": s["n"], "true negatives": s["n_true_negative"]})
    return rows


def mechanism_table(result):
    """Is the representation personal (metrics.representation_summary of z, z' and X_h'): a row
    per representation with the between-person, modality and residual fractions of its spread,
    the number of directions the persons spread along, the shared offset, person identification
    raw and centred, the prior attention's entropy over its maximum, and for the parts of X_h'
    through z and through z' (model.representations) their spread over that of X_h'."""
    rows = []
    xh_total = result["mechanism"].get("X_h'", {}).get("total", math.nan)
    for rep, m in result["mechanism"].items():
        rows.append({"representation": rep, "between": m["between"], "modality": m["modality"],
                     "residual": m["residual"], "between dims": m.get("between_dims", math.nan),
                     "offset": m["offset"], "ID raw": m["accuracy"],
                     "ID centred": m["accuracy_centred"], "chance": m["chance"],
                     "cos same / other centred": f"{m['cos_same_centred']:.3f} / {m['cos_other_centred']:.3f}",
                     "attention entropy / max": result.get("attention_entropy_ratio", math.nan) if rep == "z'"
                     else math.nan,
                     "spread / X_h'": m["total"] / xh_total if rep.startswith("X_h' via") and xh_total > 0
                     else math.nan})
    return rows


def identification_table(result):
    """Person identification (metrics.person_identification): a row per query modality with the
    accuracy of finding the same person among the features of each other modality and their
    mean; a last row "all" with the mean over pairs, the chance level and the same- and
    other-person cosine."""
    pairs = result["pairs"]
    names = list(dict.fromkeys(k.split(">")[0] for k in pairs))
    rows = []
    for a in names:
        row = {"from": a, **{f"to {b}": pairs.get(f"{a}>{b}", math.nan) for b in names}}
        row["mean"] = nanmean(row[f"to {b}"] for b in names)
        rows.append({**row, "chance": result["chance"], "cos same": math.nan, "cos other": math.nan})
    rows.append({"from": "all", **{f"to {b}": math.nan for b in names}, "mean": result["accuracy"],
                 "chance": result["chance"], "cos same": result["cos_same"], "cos other": result["cos_other"]})
    return rows


def markdown(rows, columns, digits):
    """Markdown table; a column "X" followed by "X std" is shown as "mean ± std"."""
    shown = [c for c in columns if not (c.endswith(" std") and c[:-4] in columns)]

    def fmt(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        cells = []
        for c in shown:
            cell = fmt(r[c])
            if f"{c} std" in columns and isinstance(r[f"{c} std"], float) and not math.isnan(r[f"{c} std"]):
                cell += f" ± {fmt(r[f'{c} std'])}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows, columns, path_stem, meta=None, digits=3):
    """Writes rows (dicts) as path_stem.md, .csv and .json. columns: the keys in order (None:
    the first row's). The JSON holds columns, rows and meta: protocol, policy, seed, commit (git
    rev-parse, or "unknown"), config, plus any other meta keys. All three files are written to
    temporary names first and renamed only when all succeeded. Returns the three paths."""
    stem = Path(path_stem)
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"write_table {stem}: rows must be a non-empty list of dicts")
    columns = list(rows[0]) if columns is None else list(columns)
    for i, r in enumerate(rows):
        missing = [c for c in columns if c not in r]
        if missing:
            raise ValueError(f"write_table {stem}: row {i} lacks columns {missing}")
    meta = dict(meta or {})
    for k in ("protocol", "policy", "seed", "config"):
        meta.setdefault(k, None)
    if not meta.get("commit"):
        meta["commit"] = git_commit()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns])
    texts = {
        ".md": markdown(rows, columns, digits),
        ".csv": buf.getvalue(),
        ".json": json_text({"columns": columns, "rows": [{c: r[c] for c in columns} for r in rows], "meta": meta},
                           indent=2),
    }
    paths = [Path(str(stem) + ext) for ext in texts]
    with atomic(*paths) as tmps:
        for tmp, text in zip(tmps, texts.values()):
            tmp.write_text(text, encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------
# Figures


def _numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _volume(x, name):
    a = _numpy(x)
    if a.ndim != 3:
        raise ValueError(f"{name}: expected a (D, H, W) volume, got shape {a.shape}")
    return a


VIEWS = ("axial", "coronal", "sagittal")


def _mid_slices(a):
    """Axial (fixed z), coronal (fixed y), sagittal (fixed x) mid-slices, oriented for imshow
    with origin="lower" (anterior or superior up)."""
    d, h, w = a.shape
    return [a[:, :, w // 2].T, a[:, h // 2, :].T, a[d // 2, :, :].T]


def _figure(rows, cols, panel=1.6, dpi=100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(cols * panel, rows * panel), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.04, hspace=0.12)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _save(fig, path):
    with atomic(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def figure_transfer(path, inputs, preds, truths, names, source_name, dpi=100):
    """Figures 8, 10-12: one row per target modality; columns input, generated, truth and
    signed difference generated - truth (red positive, blue negative, colour scale symmetric
    about 0), each on the axial, coronal and sagittal mid-slices. inputs: the source volume
    (D, H, W) or one per target; preds, truths: (T, D, H, W) or lists of volumes."""
    names = list(names)
    preds = [_volume(p, "figure_transfer pred") for p in preds]
    truths = [_volume(t, "figure_transfer truth") for t in truths]
    ins = _numpy(inputs)
    ins = [ins] * len(names) if ins.ndim == 3 else [_volume(i, "figure_transfer input") for i in ins]
    if not (len(preds) == len(truths) == len(ins) == len(names)) or not names:
        raise ValueError(f"figure_transfer: {len(names)} names, {len(preds)} predictions, {len(truths)} truths, "
                         f"{len(ins)} inputs: they must match and not be empty")
    kinds = (f"input ({source_name})", "generated", "truth", "generated - truth")
    fig, axes = _figure(len(names), 4 * len(VIEWS), dpi=dpi)
    for i, (name, x, p, t) in enumerate(zip(names, ins, preds, truths)):
        if not (x.shape == p.shape == t.shape):
            raise ValueError(f"figure_transfer: shapes differ for {name}: {x.shape}, {p.shape}, {t.shape}")
        lo, hi = np.percentile(t, [1, 99])
        xlo, xhi = np.percentile(x, [1, 99])
        sl = [_mid_slices(a) for a in (x, p, t, p - t)]
        lim = float(max(max(np.abs(s).max() for s in sl[3]), 1e-6))
        for k in range(4):
            for v, view in enumerate(VIEWS):
                ax = axes[i, k * len(VIEWS) + v]
                if k == 3:
                    ax.imshow(sl[k][v], cmap="bwr", vmin=-lim, vmax=lim, origin="lower")
                else:
                    a, b = (xlo, xhi) if k == 0 else (lo, hi)
                    ax.imshow(sl[k][v], cmap="gray", vmin=a, vmax=max(b, a + 1e-6), origin="lower")
                if i == 0:
                    ax.set_title(f"{kinds[k]}\n{view}", fontsize=6)
                if k == 0 and v == 0:
                    ax.set_ylabel(display_name(name), fontsize=8)
    return _save(fig, path)


# label value -> colour: BraTS NCR/NET red, edema green, enhancing tumour (3 or 4) yellow
SEG_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.1), 3: (1.0, 0.9, 0.0), 4: (1.0, 0.9, 0.0)}


def figure_segmentation(path, image, pred_label, gt_label, dpi=100, alpha=0.45):
    """Overlay of label maps on an image: row 1 ground truth, row 2 prediction, columns axial,
    coronal and sagittal mid-slices through the centre of the truth (of the volume if empty)."""
    from matplotlib.colors import ListedColormap
    img = _volume(image, "figure_segmentation image")
    labs = [_volume(gt_label, "figure_segmentation gt_label"), _volume(pred_label, "figure_segmentation pred_label")]
    if not (img.shape == labs[0].shape == labs[1].shape):
        raise ValueError(f"figure_segmentation: shapes differ: image {img.shape}, truth {labs[0].shape}, "
                         f"prediction {labs[1].shape}")
    nz = np.argwhere(labs[0] > 0)
    centre = nz.mean(0).round().astype(int) if len(nz) else np.array(img.shape) // 2

    def slices(a):
        cz, cy, cx = centre
        return [a[:, :, cx].T, a[:, cy, :].T, a[cz, :, :].T]
    cmap = ListedColormap([SEG_COLOURS.get(v, (0.2, 0.4, 1.0)) for v in range(1, 5)])
    lo, hi = np.percentile(img, [1, 99])
    fig, axes = _figure(2, len(VIEWS), panel=2.2, dpi=dpi)
    for i, (lab, title) in enumerate(zip(labs, ("truth", "prediction"))):
        for v, (s_img, s_lab) in enumerate(zip(slices(img), slices(lab))):
            ax = axes[i, v]
            ax.imshow(s_img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), origin="lower")
            ax.imshow(np.ma.masked_equal(np.clip(s_lab, 0, 4), 0), cmap=cmap, vmin=0.5, vmax=4.5,
                      alpha=alpha, origin="lower", interpolation="nearest")
            if i == 0:
                ax.set_title(VIEWS[v], fontsize=8)
            if v == 0:
                ax.set_ylabel(title, fontsize=8)
    return _save(fig, path)


def pca(feats, k=2):
    """Projection of feats (n, c) onto its first k principal axes (float64, centred). Each axis
    is signed so that its largest-magnitude loading is positive, making the result unique."""
    x = as_tensor(feats, "pca feats").double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca: expected (n >= 2, c) features, got shape {tuple(x.shape)}")
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:k]
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return x @ (axes * sign).T


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def figure_embedding(path, feats, modality, person, dpi=100):
    """Figure 9: 2-D PCA of features (n, c), colour by modality, marker by person (persons
    beyond the marker list are also written next to their points)."""
    from matplotlib.lines import Line2D
    modality, person = [str(m) for m in modality], [str(p) for p in person]
    f = as_tensor(feats, "figure_embedding feats").detach().cpu()
    f = rearrange(f, "n ... -> n (...)")
    if not (len(modality) == len(person) == f.shape[0]):
        raise ValueError(f"figure_embedding: {f.shape[0]} features, {len(modality)} modality and "
                         f"{len(person)} person labels")
    xy = pca(f, 2).numpy()
    mods, people = list(dict.fromkeys(modality)), list(dict.fromkeys(person))
    from matplotlib import colormaps
    colours = colormaps["tab10"]
    fig, axes = _figure(1, 1, panel=4.0, dpi=dpi)
    ax = axes[0, 0]
    fig.subplots_adjust(left=0.08, right=0.72, bottom=0.08, top=0.92)
    for i, (m, p) in enumerate(zip(modality, person)):
        j = people.index(p)
        ax.scatter(xy[i, 0], xy[i, 1], color=colours(mods.index(m) % 10), marker=MARKERS[j % len(MARKERS)], s=28)
        if j >= len(MARKERS):
            ax.annotate(p, xy[i], fontsize=5)
    handles = [Line2D([], [], color=colours(i % 10), marker="o", linestyle="", label=m) for i, m in enumerate(mods)]
    handles += [Line2D([], [], color="0.4", marker=MARKERS[j % len(MARKERS)], linestyle="", label=p)
                for j, p in enumerate(people[:len(MARKERS)])]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("PCA of X_h' (colour: modality, marker: person)", fontsize=8)
    ax.set_xlabel("PC 1", fontsize=7)
    ax.set_ylabel("PC 2", fontsize=7)
    return _save(fig, path)




def figure_curves(path, panels, xlabel, ylabel, dpi=100):
    """Line plots side by side, one panel per entry of `panels` ({title: {label: (x, mean,
    std)}}): each curve its mean with a band of one standard deviation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.5 * len(panels), 3.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (title, curves) in zip(axes, panels.items()):
        for label, (x, m, sd) in curves.items():
            m, sd = np.asarray(m, dtype=float), np.asarray(sd, dtype=float)
            line, = ax.plot(x, m, marker="o", label=label)
            ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend()
    fig.tight_layout()
    return _save(fig, path)


def figure_prediction(path, volumes, label=None, dpi=100, alpha=0.45):
    """predict.py's preview: one row per volume of `volumes` ({title: (D, H, W)}, inputs then
    generated modalities), columns axial, coronal and sagittal slices through the centre of the
    label map (of the volume when there is none or it is empty); with a label map a last row
    draws it over the first volume. Every volume on one (RAS) grid."""
    from matplotlib.colors import ListedColormap
    vols = {k: _volume(v, f"figure_prediction {k}") for k, v in volumes.items()}
    shapes = {v.shape for v in vols.values()} | ({_volume(label, "figure_prediction label").shape}
                                                  if label is not None else set())
    if not vols or len(shapes) != 1:
        raise ValueError(f"figure_prediction: volumes (and label) must share one shape, got {sorted(shapes)}")
    rows = list(vols.items()) + ([(f"segmentation on {next(iter(vols))}", next(iter(vols.values())))]
                                 if label is not None else [])
    nz = np.argwhere(_numpy(label) > 0) if label is not None else np.zeros((0, 3))
    centre = nz.mean(0).round().astype(int) if len(nz) else np.array(next(iter(shapes))) // 2

    def slices(a):  # through the segmentation's centre (the volume's when it is empty)
        cz, cy, cx = centre
        return [a[:, :, cx].T, a[:, cy, :].T, a[cz, :, :].T]
    fig, axes = _figure(len(rows), len(VIEWS), panel=2.0, dpi=dpi)
    cmap = ListedColormap([SEG_COLOURS.get(v, (0.2, 0.4, 1.0)) for v in range(1, 5)])
    for i, (title, vol) in enumerate(rows):
        lo, hi = np.percentile(vol, [1, 99])
        for v, s in enumerate(slices(vol)):
            ax = axes[i, v]
            ax.imshow(s, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), origin="lower")
            if label is not None and i == len(rows) - 1:
                lab = slices(_volume(label, "label"))[v]
                ax.imshow(np.ma.masked_equal(np.clip(lab, 0, 4), 0), cmap=cmap, vmin=0.5, vmax=4.5, alpha=alpha,
                          origin="lower", interpolation="nearest")
            if i == 0:
                ax.set_title(VIEWS[v], fontsize=8)
            if v == 0:
                ax.set_ylabel(title, fontsize=7)
    return _save(fig, path)
