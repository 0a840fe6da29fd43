"""Proxy-Anchor loss (Kim et al., CVPR 2020), SPEC §5."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProxyAnchorLoss(nn.Module):
    """``L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-a (s - d)))
           + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( a (s + d)))``

    ``forward(embeddings, labels, proxies=None)`` uses the loss's own learnable proxies unless
    ``proxies`` (one row per class) are passed in, as semantic-proxy methods do.
    ``positive_average="all"`` divides the positive term by |P| instead of |P+|, as the paper's
    reference implementation does.
    """

    def __init__(self, num_classes: int, embedding_size: int, alpha: float = 32.0, delta: float = 0.1,
                 positive_average: str = "positive"):
        super().__init__()
        if positive_average not in ("positive", "all"):
            raise ValueError(f"positive_average must be 'positive' or 'all', got {positive_average!r}")
        self.num_classes = num_classes
        self.alpha = alpha
        self.delta = delta
        self.positive_average = positive_average
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.proxies.per_class = True  # one row per class: counted apart (bench.measure.parameter_counts)
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                proxies: torch.Tensor | None = None) -> torch.Tensor:
        proxies = self.proxies if proxies is None else proxies
        # fp32 even under autocast: exp(32 * 1.1) overflows half precision
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, proxies.dtype), torch.float32)
        cos = F.normalize(embeddings.to(dtype), dim=1) @ F.normalize(proxies.to(dtype), dim=1).T  # [B, C]
        is_positive = F.one_hot(labels, num_classes=proxies.shape[0]).bool()

        pos_logits = torch.where(is_positive, -self.alpha * (cos - self.delta), _NEG)
        neg_logits = torch.where(is_positive, _NEG, self.alpha * (cos + self.delta))
        pos_term = _log1p_sum_exp(pos_logits)  # [C]; 0 for proxies without a positive
        neg_term = _log1p_sum_exp(neg_logits)

        num_with_positive = is_positive.any(dim=0).sum()
        pos_denominator = num_with_positive if self.positive_average == "positive" else proxies.shape[0]
        return pos_term.sum() / pos_denominator + neg_term.sum() / proxies.shape[0]


_NEG = torch.tensor(-1e4)  # exp(-1e4) == 0 in fp32, and finite, so gradients stay finite


def _log1p_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_rows exp(logits)) per column, stable: logsumexp over [logits; 0]."""
    zeros = logits.new_zeros(1, logits.shape[1])
    return torch.logsumexp(torch.cat([logits, zeros], dim=0), dim=0)
