"""Proxy-Anchor against a loop over the SPEC formula and against pytorch-metric-learning."""
import math

import pytest
import torch
import torch.nn.functional as F

from bench.losses import ProxyAnchorLoss


def loop_proxy_anchor(emb, labels, proxies, alpha=32.0, delta=0.1, positive_average="positive"):
    """SPEC §5, literally: sums over proxies and samples in Python."""
    emb = F.normalize(emb, dim=1)
    proxies = F.normalize(proxies, dim=1)
    num_classes = proxies.shape[0]
    positive_proxies = sorted(set(labels.tolist()))
    pos_total = 0.0
    neg_total = 0.0
    for p in range(num_classes):
        pos_sum = 0.0
        neg_sum = 0.0
        for i in range(emb.shape[0]):
            s = emb[i] @ proxies[p]
            if labels[i] == p:
                pos_sum = pos_sum + torch.exp(-alpha * (s - delta))
            else:
                neg_sum = neg_sum + torch.exp(alpha * (s + delta))
        if p in positive_proxies:
            pos_total = pos_total + torch.log(1 + pos_sum)
        neg_total = neg_total + torch.log(1 + neg_sum)
    pos_denominator = len(positive_proxies) if positive_average == "positive" else num_classes
    return pos_total / pos_denominator + neg_total / num_classes


def batch(seed=0, n=12, classes=7, dim=16):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes - 2, (n,), generator=g)  # two proxies without positives
    proxies = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    return emb, labels, proxies


@pytest.mark.parametrize("positive_average", ["positive", "all"])
def test_matches_loop_formula_with_gradients(positive_average):
    emb, labels, proxies = batch()
    loss_fn = ProxyAnchorLoss(proxies.shape[0], proxies.shape[1], positive_average=positive_average).double()
    e1, p1 = emb.clone().requires_grad_(), proxies.clone().requires_grad_()
    e2, p2 = emb.clone().requires_grad_(), proxies.clone().requires_grad_()
    ours = loss_fn(e1, labels, p1)
    reference = loop_proxy_anchor(e2, labels, p2, positive_average=positive_average)
    ours.backward()
    reference.backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(e1.grad.double(), e2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p1.grad.double(), p2.grad, rtol=1e-5, atol=1e-7)


def test_own_proxies_are_used_and_learn():
    emb, labels, _ = batch(seed=1)
    loss_fn = ProxyAnchorLoss(7, 16).double()
    loss = loss_fn(emb, labels)
    loss.backward()
    assert loss_fn.proxies.grad is not None and loss_fn.proxies.grad.abs().sum() > 0
    assert loss.item() == pytest.approx(loop_proxy_anchor(emb, labels, loss_fn.proxies.detach()).item(), rel=1e-6)


def test_matches_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb, labels, proxies = batch(seed=2)
    emb, proxies = emb.float(), proxies.float()
    theirs = pml.ProxyAnchorLoss(num_classes=7, embedding_size=16, margin=0.1, alpha=32)
    with torch.no_grad():
        theirs.proxies.copy_(proxies)
    ours = ProxyAnchorLoss(7, 16)
    with torch.no_grad():
        ours.proxies.copy_(proxies)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    l1, l2 = ours(e1, labels), theirs(e2, labels)
    l1.backward()
    l2.backward()
    assert l1.item() == pytest.approx(l2.item(), abs=1e-5)
    torch.testing.assert_close(e1.grad, e2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.proxies.grad, theirs.proxies.grad, atol=1e-5, rtol=1e-4)


def test_large_similarities_stay_finite():
    loss_fn = ProxyAnchorLoss(3, 4, alpha=64.0)
    emb = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], requires_grad=True)
    proxies = torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    loss = loss_fn(emb, torch.tensor([0, 1]), proxies)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(emb.grad).all()
