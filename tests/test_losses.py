"""losses.py against values computed by hand on tiny tensors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses


def test_info_nce_by_hand():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.6, 0.8]])
    n = torch.tensor([[0.0, 1.0]])
    # s+ = 0.6, s- = 0, tau 0.5 -> -log(e^1.2 / (e^1.2 + e^0))
    want = -math.log(math.exp(1.2) / (math.exp(1.2) + 1.0))
    got = losses.info_nce(a, p, n, tau=0.5)
    assert abs(got.item() - want) < 1e-6
    assert torch.isfinite(got) and got.item() > 0  # batch size 1: finite and non-zero


def test_info_nce_with_other_persons_excludes_self():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    p = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    n = F.normalize(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), dim=-1)
    tau = 0.2
    got = losses.info_nce(a, p, n, others=a, offset=0, tau=tau)
    total = 0.0
    for i in range(2):
        sp, sn = (a[i] @ p[i]).item(), (a[i] @ n[i]).item()
        so = [(a[i] @ a[j]).item() for j in range(2) if j != i]
        den = math.exp(sp / tau) + math.exp(sn / tau) + sum(math.exp(s / tau) for s in so)
        total += -math.log(math.exp(sp / tau) / den)
    assert abs(got.item() - total / 2) < 1e-5


def test_equivariance_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    want = -math.log(math.exp(2) / (math.exp(2) + 3))
    assert abs(losses.equivariance_loss(logits, torch.tensor([0])).item() - want) < 1e-6


def test_invariance_is_pearson_distance_with_running_anchor():
    g = torch.Generator().manual_seed(0)
    x1, x2, x3 = (torch.randn(2, 6, 2, 2, 1, generator=g) for _ in range(3))

    def by_numpy(x, a):  # 2 (1 - Pearson r) of each voxel's channel vector, averaged
        x, a = x.movedim(1, -1).reshape(-1, 6).numpy(), a.movedim(1, -1).reshape(-1, 6).numpy()
        return np.mean([2 * (1 - np.corrcoef(u, v)[0, 1]) for u, v in zip(x, a)])

    anchor = None
    assert losses.invariance_loss(x1, anchor).item() == 0.0
    anchor = losses.update_anchor(anchor, x1)
    assert torch.equal(anchor, x1)
    assert abs(losses.invariance_loss(x2, anchor).item() - by_numpy(x2, x1)) < 1e-5
    anchor = losses.update_anchor(anchor, x2)
    assert torch.allclose(anchor, (x1 + x2) / 2)
    assert abs(losses.invariance_loss(x3, anchor).item() - by_numpy(x3, (x1 + x2) / 2)) < 1e-5
    # the anchor is a stop-gradient: gradient flows only into the current feature
    y = x3.clone().requires_grad_(True)
    a = x1.clone().requires_grad_(True)
    losses.invariance_loss(y, a).backward()
    assert a.grad is None and y.grad.abs().sum() > 0


def test_invariance_cannot_be_satisfied_by_shrinking():
    """Scaling X_h' and the anchor by the same factor leaves L_inv unchanged (a plain MSE would
    fall with the square of the factor, so shrinking X_h' would satisfy it for free)."""
    g = torch.Generator().manual_seed(1)
    x, anchor = torch.randn(2, 24, 3, 3, 3, generator=g), torch.randn(2, 24, 3, 3, 3, generator=g)
    base = losses.invariance_loss(x, anchor).item()
    assert base > 0.5
    for s in (1e-3, 0.1, 7.0, 1e3):
        assert abs(losses.invariance_loss(s * x, s * anchor).item() - base) < 1e-5 * base
    assert losses.invariance_loss(3.0 * anchor + 1.0, anchor).item() < 1e-6  # an affine copy is invariant


def test_decomposition_foreground_weighting():
    pred = torch.zeros(1, 1, 1, 1, 4)
    target = torch.tensor([1.0, 2.0, 0.0, 0.0]).view(1, 1, 1, 1, 4)
    fg = torch.tensor([True, False, False, False]).view(1, 1, 1, 1, 4)
    # fg MSE = 1 / 1 voxel; all MSE = (1 + 4) / 4
    got = losses.decomposition_loss(pred, target, fg, w_fg=10.0)
    assert abs(got.item() - (10 * 1.0 + 5 / 4)) < 1e-6
    assert abs(losses.decomposition_loss(pred, target, torch.zeros_like(fg)).item() - 5 / 4) < 1e-6
    # per-sample foreground means, then the batch mean
    pred2 = torch.zeros(2, 1, 1, 1, 4)
    target2 = torch.stack([target[0], torch.full((1, 1, 1, 4), 2.0)])
    fg2 = torch.stack([fg[0], torch.ones(1, 1, 1, 4, dtype=torch.bool)])
    want = ((10 * 1.0 + 5 / 4) + (10 * 4.0 + 4.0)) / 2
    assert abs(losses.decomposition_loss(pred2, target2, fg2).item() - want) < 1e-5


def test_seg_loss_by_hand():
    logits = torch.tensor([0.0, 2.0]).view(1, 1, 1, 1, 2)
    target = torch.tensor([0.0, 1.0]).view(1, 1, 1, 1, 2)
    p = torch.sigmoid(logits).flatten()
    dice = 1 - (2 * p[1] + 1e-5) / (p.sum() + 1 + 1e-5)
    w = 3.0
    bce = (-math.log(1 - p[0].item()) + w * -math.log(p[1].item())) / 2
    got = losses.seg_loss(logits, target, pos_weight=torch.tensor([w]))
    assert abs(got.item() - (dice.item() + bce)) < 1e-5
    # default weight: sqrt(neg/pos) = 1 here
    got = losses.seg_loss(logits, target)
    bce1 = (-math.log(1 - p[0].item()) - math.log(p[1].item())) / 2
    assert abs(got.item() - (dice.item() + bce1)) < 1e-5


def test_person_nce_against_a_hand_computed_value_and_leaves_the_person_out():
    torch.manual_seed(0)
    xh, anchor, others = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.randn(4, 3, 2, 2)
    persons, other_persons = torch.tensor([5, 7]), torch.tensor([5, 1, 2, 7])  # rows 0 and 3: themselves
    got = losses.person_nce(xh, anchor, others, persons, other_persons, tau=0.5)
    unit = lambda t: t.flatten(1) / t.flatten(1).norm(dim=1, keepdim=True)
    q, p, o = unit(xh), unit(anchor), unit(others)
    want = []
    for b, keep in ((0, [1, 2, 3]), (1, [0, 1, 2])):
        pos = math.exp(float(q[b] @ p[b]) / 0.5)
        neg = sum(math.exp(float(q[b] @ o[k]) / 0.5) for k in keep)
        want.append(-math.log(pos / (pos + neg)))
    assert float(got) == pytest.approx(sum(want) / 2, rel=1e-5)
    # one X_h' for every person: the paper's L_inv is 0, L_pers is not
    same = torch.ones(2, 3, 2, 2)
    assert float(losses.invariance_loss(same, same)) == 0
    assert float(losses.person_nce(same, same, torch.ones(4, 3, 2, 2), persons, other_persons, 0.5)) == \
        pytest.approx(-math.log(1 / 4))
    # nobody else yet (or only the person itself): no term
    assert float(losses.person_nce(xh, None, others, persons, other_persons)) == 0
    assert float(losses.person_nce(xh, anchor, others[:1], torch.tensor([5, 5]), torch.tensor([5]))) == 0


def test_person_nce_centred_compares_vectors_around_the_others_mean():
    """centre=True: the same written-out loss on every vector less the others' mean; a shared
    offset, which makes raw cosines ~1 whoever the persons, then changes nothing."""
    torch.manual_seed(1)
    xh, anchor, others = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.randn(4, 3, 2, 2)
    persons, other_persons = torch.tensor([5, 7]), torch.tensor([5, 1, 2, 7])
    mean = others.flatten(1).mean(0)
    unit = lambda t: (t.flatten(1) - mean) / (t.flatten(1) - mean).norm(dim=1, keepdim=True)
    q, p, o = unit(xh), unit(anchor), unit(others)
    want = []
    for b, keep in ((0, [1, 2, 3]), (1, [0, 1, 2])):
        pos = math.exp(float(q[b] @ p[b]) / 0.5)
        want.append(-math.log(pos / (pos + sum(math.exp(float(q[b] @ o[k]) / 0.5) for k in keep))))
    got = losses.person_nce(xh, anchor, others, persons, other_persons, tau=0.5, centre=True)
    assert float(got) == pytest.approx(sum(want) / 2, rel=1e-5)
    offset = 100 * torch.randn(1, 3, 2, 2)
    shifted = losses.person_nce(xh + offset, anchor + offset, others + offset, persons, other_persons, 0.5, True)
    assert float(shifted) == pytest.approx(float(got), rel=1e-4)
    raw = losses.person_nce(xh + offset, anchor + offset, others + offset, persons, other_persons, 0.5)
    assert float(raw) == pytest.approx(-math.log(1 / 4), abs=0.05)  # raw: every cosine ~1, loss ~ log 4


def test_person_variance_against_a_hand_computed_value():
    """L_var by numpy: standardise each voxel's channel vector, the unbiased variance of every
    entry over the person and the other persons' anchors (the person itself left out), the hinge
    at the floor; a shared X_h' gives about the floor, persons far apart give 0, scale is free."""
    torch.manual_seed(0)
    xh, others = torch.randn(2, 3, 2, 2), torch.randn(4, 3, 2, 2)
    persons, other_persons = torch.tensor([5, 7]), torch.tensor([5, 1, 2, 7])
    got = losses.person_variance(xh, others, persons, other_persons, floor=0.8)

    def standardise(t):
        t = t.numpy().astype(np.float64)
        t = t - t.mean(1, keepdims=True)
        return (t / np.sqrt((t ** 2).mean(1, keepdims=True))).reshape(len(t), -1)
    q, o = standardise(xh), standardise(others)
    want = [np.maximum(0, 0.8 - np.sqrt(np.vstack([q[b], o[keep]]).var(0, ddof=1) + 1e-4)).mean()
            for b, keep in ((0, [1, 2, 3]), (1, [0, 1, 2]))]
    assert float(got) == pytest.approx(np.mean(want), rel=1e-5)
    assert float(losses.person_variance(xh * 7.0, others * 0.1, persons, other_persons, floor=0.8)) == \
        pytest.approx(float(got), rel=1e-5)
    # one X_h' for every person: the paper's L_inv is 0, L_var is the floor less sqrt(eps)
    same = torch.randn(1, 3, 2, 2)
    assert float(losses.invariance_loss(same.expand(2, -1, -1, -1), same.expand(2, -1, -1, -1))) == \
        pytest.approx(0, abs=1e-12)
    assert float(losses.person_variance(same.expand(2, -1, -1, -1), same.expand(4, -1, -1, -1), persons,
                                        other_persons, 0.8)) == pytest.approx(0.8 - 1e-2, rel=1e-4)
    # two persons whose standardised entries are +1 and -1: variance 2, above a floor of 1
    a = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    assert float(losses.person_variance(a, -a, torch.tensor([0]), torch.tensor([1]), floor=1.0)) == 0
    # the gradient reaches X_h' and not the anchors; nobody else yet: no term
    x, oth = xh.clone().requires_grad_(), others.clone().requires_grad_()
    losses.person_variance(x, oth, persons, other_persons).backward()
    assert x.grad.abs().sum() > 0 and oth.grad is None
    assert float(losses.person_variance(xh, None, persons, None)) == 0
    assert float(losses.person_variance(xh, others[:1], torch.tensor([5, 5]), torch.tensor([5]))) == 0


def test_person_spread_against_eigenvalues_and_hand_cases():
    """L_cov = 1 / participation ratio - 1 / (n - 1) of each person's set, against numpy's
    eigenvalues of the set's covariance over entries; persons along orthogonal directions give
    0, persons on one line (or not spread at all) 1 - 1 / (n - 1); scale is free."""
    torch.manual_seed(0)
    xh, others = torch.randn(2, 3, 2, 2), torch.randn(4, 3, 2, 2)
    persons, other_persons = torch.tensor([5, 7]), torch.tensor([5, 1, 2, 7])
    got = losses.person_spread(xh, others, persons, other_persons)

    def standardise(t):
        t = t.numpy().astype(np.float64)
        t = t - t.mean(1, keepdims=True)
        return (t / np.sqrt((t ** 2).mean(1, keepdims=True))).reshape(len(t), -1)
    q, o = standardise(xh), standardise(others)
    want = []
    for b, keep in ((0, [1, 2, 3]), (1, [0, 1, 2])):
        lam = np.linalg.eigvalsh(np.cov(np.vstack([q[b], o[keep]]), rowvar=False))
        want.append((lam ** 2).sum() / lam.sum() ** 2 - 1 / 3)
    assert float(got) == pytest.approx(np.mean(want), rel=1e-5)
    assert float(losses.person_spread(xh * 7.0, others * 0.1, persons, other_persons)) == \
        pytest.approx(float(got), rel=1e-5)
    # three standardised persons along orthogonal directions: 0; on one line: 1 - 1/2
    a, b, c = (torch.tensor(v).view(1, 4, 1) for v in ([1., 1, -1, -1], [1., -1, 1, -1], [1., -1, -1, 1]))
    one = torch.tensor([0])
    assert float(losses.person_spread(a, torch.cat([b, c]), one, torch.tensor([1, 2]))) == pytest.approx(0, abs=1e-6)
    assert float(losses.person_spread(a, torch.cat([-a, a]), one, torch.tensor([1, 2]))) == pytest.approx(0.5)
    # one X_h' for every person: no spread, the same maximum; L_var's floor is met by a line, this is not
    assert float(losses.person_spread(a, torch.cat([a, a]), one, torch.tensor([1, 2]))) == pytest.approx(0.5)
    line = torch.cat([a * 3, -a * 3])
    assert float(losses.person_variance(a * 3, line, one, torch.tensor([1, 2]), floor=0.5)) == 0
    # the gradient reaches X_h' and not the anchors; a set of 2, or nobody else: no term
    x, oth = xh.clone().requires_grad_(), others.clone().requires_grad_()
    losses.person_spread(x, oth, persons, other_persons).backward()
    assert x.grad.abs().sum() > 0 and oth.grad is None
    assert float(losses.person_spread(xh, None, persons, None)) == 0
    assert float(losses.person_spread(xh, others[1:2], persons, other_persons[1:2])) == 0
