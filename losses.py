"""Losses of the two stages (METHOD.md). Every function takes batched tensors and returns a scalar.

Stage 1: info_nce (L_contr), equivariance_loss (L_equ), invariance_loss with a running anchor
(L_inv, scale-free), decomposition_loss (L_decom); accuracy of the contrastive and transform
logits for the log. Two options beside the paper's losses, under which a constant X_h' no longer
satisfies the losses: person_nce (L_pers, other persons as negatives for X_h') and
person_variance (L_var, a floor on the spread of X_h' across persons). Stage 2 segmentation: seg_loss (Dice + weighted BCE).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


class _Gather(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank's copy of each slice and
    returns this rank's: training on N ranks gives the gradients of one process holding the
    whole global batch."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x):
    """Concatenate x (b, d) from every data-parallel rank -> (world * b, d), differentiable
    (the local part directly, the other ranks' parts through their own backward).
    Returns (all, offset of the local part)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _Gather.apply(x), dist.get_rank() * x.shape[0]


def nce_logits(anchor, positive, negative, others=None, offset=0, tau=0.1):
    """Logits of L_contr, (b, 2 + n): column 0 the positive view, 1 the negative view, then the
    persons of the global batch (the anchor itself at row offset + i masked to -inf).

    anchor, positive, negative: (b, d) L2-normalised embeddings of the input, its positive view
    (same geometry) and its negative view (other geometry). others: (n, d) embeddings of the
    persons of the global batch. Cosine similarity over temperature tau."""
    s_pos = (anchor * positive).sum(-1, keepdim=True)  # (b, 1)
    s_neg = (anchor * negative).sum(-1, keepdim=True)
    logits = [s_pos, s_neg]
    if others is not None and others.shape[0] > 1:
        s_oth = anchor @ others.t()  # (b, n)
        self_idx = torch.arange(anchor.shape[0], device=anchor.device) + offset
        s_oth = s_oth.masked_fill(F.one_hot(self_idx, others.shape[0]).bool(), float("-inf"))
        logits.append(s_oth)
    return torch.cat(logits, 1) / tau


def nce_loss(logits):
    """L_contr from the logits of nce_logits: cross-entropy with the positive view (column 0)."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def info_nce(anchor, positive, negative, others=None, offset=0, tau=0.1):
    """L_contr = -log( e^{s+/tau} / (e^{s+/tau} + e^{s-/tau} + sum_others e^{s/tau}) ) over the
    logits of nce_logits; defined at batch size 1 (the negative view is always there)."""
    return nce_loss(nce_logits(anchor, positive, negative, others, offset, tau))


def accuracy(logits, target):
    """Fraction of rows whose largest logit is the target class (an int or a (b,) tensor)."""
    target = torch.as_tensor(target, device=logits.device).expand(logits.shape[0])
    return (logits.detach().argmax(1) == target).float().mean()


def equivariance_loss(logits, k):
    """L_equ: cross-entropy of F_equ(z) against the class k of the transform applied."""
    return F.cross_entropy(logits, k)


def channel_standardise(x, eps=1e-12):
    """Each voxel's channel vector of x (b, C, ...) to zero mean and unit variance (layer
    normalisation over channels without affine): invariant to the scale of x."""
    x = x.float()
    x = x - x.mean(1, keepdim=True)
    return x / (x.square().mean(1, keepdim=True) + eps).sqrt()


def invariance_loss(x, anchor):
    """L_inv = MSE between X_h^i' and sg(anchor), both standardised over channels per voxel:
    2 (1 - r) averaged over voxels, r the Pearson correlation of the two channel vectors. It is
    the same for x and anchor scaled by any factor, so shrinking X_h' cannot satisfy it and it
    weighs the same with and without the prior. Zero (and no gradient path) when there is no
    anchor yet, i.e. for the first modality of a person."""
    if anchor is None:
        return x.sum() * 0.0
    return F.mse_loss(channel_standardise(x), channel_standardise(anchor.detach()))


def update_anchor(anchor, x):
    """Running stop-gradient anchor: sg(x) for the first modality, then (anchor + sg(x)) / 2."""
    x = x.detach()
    return x if anchor is None else (anchor + x) / 2


def person_nce(xh, anchor, others, person, other_persons, tau=0.1, centre=False):
    """L_pers, not one of the paper's losses: InfoNCE on the flattened X_h^i' of each person
    (b, ...) with its own anchor (the person's earlier modalities) as the positive and other
    persons' anchors, others (n, ...), as negatives; both stop-gradient. person (b,) and
    other_persons (n,) are person indices: an entry of the person itself among the others (its
    own row of the global batch, an earlier step's) is left out. L_inv alone is satisfied by one
    X_h' for every person; this term is not. Zero (no gradient path) without an anchor or without
    another person. centre=True first subtracts the others' mean (stop-gradient) from every
    vector, as centred identification does: cosines of raw vectors around a large shared offset
    are all near 1 and tell the persons apart by little."""
    if anchor is None or others is None:
        return xh.sum() * 0.0
    same = person.view(-1, 1) == other_persons.view(1, -1)  # (b, n)
    if same.all():
        return xh.sum() * 0.0
    q, pos, oth = xh.float().flatten(1), anchor.detach().float().flatten(1), others.detach().float().flatten(1)
    if centre:
        mean = oth.mean(0, keepdim=True)
        q, pos, oth = q - mean, pos - mean, oth - mean
    q, pos, oth = (F.normalize(t, dim=-1) for t in (q, pos, oth))
    s_oth = (q @ oth.t()).masked_fill(same, float("-inf"))
    return nce_loss(torch.cat([(q * pos).sum(-1, keepdim=True), s_oth], 1) / tau)


def _person_sets(xh, others, person, other_persons):
    """For each person j of the batch, the set of L_var and L_cov: its standardised, flattened
    X_h' (with gradient) and the other persons' stop-gradient anchors (entries of j left out),
    (n, d); none without others."""
    if others is None:
        return []
    q = channel_standardise(xh).flatten(1)
    oth = channel_standardise(others.detach()).flatten(1)
    return [torch.cat([q[j:j + 1], oth[other_persons != person[j]]]) for j in range(q.shape[0])]


def person_variance(xh, others, person, other_persons, floor=0.5, eps=1e-4):
    """L_var, not one of the paper's losses: a floor on the spread of X_h^i' across persons
    (VICReg's variance term). For each person j of the batch, the set of its X_h' (b, ...) and the
    stop-gradient anchors of the other persons, others (n, ...) with person indices
    other_persons (n,) (entries of person j itself left out); every vector standardised over
    channels per voxel (channel_standardise, so scaling X_h' changes nothing), then flattened.
    L_var = mean over entries of max(0, floor - sqrt(var + eps)), var the unbiased variance of
    the entry over the set; mean over the batch's persons. A constant X_h' gives about floor, its
    maximum; persons whose standardised X_h' differ by at least floor * sqrt(2) in every entry
    give 0. With L_inv (no spread across a person's modalities) the spread it asks for can only
    be between persons. Zero (no gradient path) without another person."""
    terms = [F.relu(floor - (s.var(0) + eps).sqrt()).mean()
             for s in _person_sets(xh, others, person, other_persons) if len(s) > 1]
    return torch.stack(terms).mean() if terms else xh.sum() * 0.0


def person_spread(xh, others, person, other_persons, eps=1e-8):
    """L_cov, not one of the paper's losses: how few directions the persons' X_h' spread along,
    VICReg's covariance term in its Gram form and made scale-free. The set of each person j is
    that of person_variance (its X_h' and the other persons' stop-gradient anchors, standardised
    over channels per voxel, flattened), n vectors centred on their mean, G their Gram matrix
    (n, n). L_cov = ||G||_F^2 / tr(G)^2 - 1 / (n - 1), the reciprocal of the set's participation
    ratio (metrics.variance_decomposition's between dims) less its smallest value: 0 when the
    persons stand at equal distances along n - 1 orthogonal directions, 1 - 1 / (n - 1) when they
    lie on one line, and that maximum, without gradient, for a set with no spread. L_var's floor
    on every entry is met by one direction shared by all entries; this term is not. Mean over the
    batch's persons; zero (no gradient path) for sets of fewer than 3, where the spread is one
    direction whatever X_h' is."""
    terms = []
    for s in _person_sets(xh, others, person, other_persons):
        n = len(s)
        if n < 3:
            continue
        s = s - s.mean(0, keepdim=True)
        gram = s @ s.T
        trace = gram.diagonal().sum()
        if trace <= eps * s.shape[1]:  # no spread: as bad as one line
            terms.append(s.new_tensor(1.0 - 1.0 / (n - 1)) + xh.sum() * 0.0)
        else:
            terms.append(gram.square().sum() / trace.square() - 1.0 / (n - 1))
    return torch.stack(terms).mean() if terms else xh.sum() * 0.0


def decomposition_loss(pred, target, fg, w_fg=10.0):
    """L_decom = w_fg * MSE over foreground voxels + MSE over all voxels, per sample, then the
    batch mean (so a batch split over ranks gives the same loss as one process).

    pred, target: (b, c, D, H, W); fg: (b, 1, D, H, W) bool, the body/brain mask from the data.
    The foreground term averages over the foreground voxels of every channel; it is 0 for a crop
    without foreground."""
    err = (pred.float() - target.float()).square().flatten(2)  # (b, c, n)
    mask = fg.flatten(2).expand_as(err).float()
    fg_term = (err * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1.0)
    return (w_fg * fg_term + err.mean((1, 2))).mean()


def dice_loss(logits, target, smooth=1e-5):
    """Soft Dice over each channel of sigmoid(logits), batch and space pooled, mean over channels."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    dims = (0,) + tuple(range(2, p.dim()))
    inter = (p * t).sum(dims)
    return (1 - (2 * inter + smooth) / (p.sum(dims) + t.sum(dims) + smooth)).mean()


def seg_loss(logits, target, pos_weight=None, max_weight=10.0):
    """Dice + weighted binary cross-entropy for region-based (sigmoid) segmentation.

    logits, target: (b, K, D, H, W). pos_weight: (K,) weight of positive voxels; by default the
    batch's negative/positive ratio per channel, square-rooted and clipped to [1, max_weight],
    so small regions (ET, lesions) are not drowned by background."""
    t = target.float()
    if pos_weight is None:
        dims = (0,) + tuple(range(2, t.dim()))
        pos = t.sum(dims)
        neg = t[:, :1].numel() - pos
        pos_weight = (neg / pos.clamp_min(1.0)).sqrt().clamp(1.0, max_weight)
    w = pos_weight.view(1, -1, *([1] * (t.dim() - 2))).to(t)
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, pos_weight=w)
    return dice_loss(logits, t) + bce
