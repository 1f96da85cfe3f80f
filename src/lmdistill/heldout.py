"""Teacher-forced statistics of a model on tokenised rows: cross-entropy, next-token accuracy, calibration.

One pass of the model over the rows' reference responses (no generation). Below the methods and
the training loop, so that both (DistiLLM's adaptive schedule, the loop's held-out evaluation) and
the evaluation run (:mod:`lmdistill.evaluate`) use the same numbers; it imports nothing above
``data``.

- Cross-entropy: summed over response tokens (position t predicts token t + 1), in nats.
- Next-token accuracy: share of response tokens whose arg-max prediction is the reference token.
- Expected calibration error (Guo et al. 2017): equal-width bins ((m-1)/M, m/M] of the
  next-token confidence; ECE = sum_m n_m / N * |accuracy_m - confidence_m|.

Everything is kept as sums (:class:`TokenStats`), added over batches and processes before means are taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.data.tokenize import IGNORE_INDEX, Encoded, collate
from lmdistill.losses import trained_window
from lmdistill.models import causal_logits


def calibration_bins(confidence: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """Per-bin (count, summed confidence, summed correctness) for the ECE.

    confidence: (N,) float in [0, 1], the probability of the predicted (arg-max) token.
    correct: (N,) bool, whether that token is the reference one.
    Returns (n_bins, 3) float64; bin m holds confidences in ((m-1)/M, m/M], the first also 0.
    """
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ValueError(f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} must be equal (N,)")
    conf = confidence.detach().double()
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    out = torch.zeros(n_bins, 3, dtype=torch.float64, device=conf.device)
    out[:, 0].index_add_(0, idx, torch.ones_like(conf))
    out[:, 1].index_add_(0, idx, conf)
    out[:, 2].index_add_(0, idx, correct.double())
    return out.cpu()


def expected_calibration_error(bins: Tensor) -> float:
    """ECE = Σ_m n_m/N · |acc_m − conf_m| from :func:`calibration_bins`' (n_bins, 3) sums; NaN for N = 0."""
    count, conf, correct = bins[:, 0], bins[:, 1], bins[:, 2]
    total = float(count.sum())
    if total == 0:
        return math.nan
    return float((correct - conf).abs().sum() / total)  # n_m·|acc_m − conf_m| = |Σ correct − Σ conf|


@dataclass
class TokenStats:
    """Sums over held-out response tokens, added over batches and processes before taking means."""

    ce: float
    """Summed cross-entropy, nats."""
    tokens: int
    """Number of scored tokens."""
    correct: int
    """Tokens whose arg-max prediction is the reference token."""
    bins: Tensor
    """(n_bins, 3) calibration sums (see :func:`calibration_bins`)."""

    @classmethod
    def zeros(cls, n_bins: int) -> TokenStats:
        return cls(0.0, 0, 0, torch.zeros(n_bins, 3, dtype=torch.float64))

    def __add__(self, other: TokenStats) -> TokenStats:
        return TokenStats(self.ce + other.ce, self.tokens + other.tokens, self.correct + other.correct,
                          self.bins + other.bins)

    def to_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """Flat float64 vector (for a cross-process sum)."""
        head = torch.tensor([self.ce, self.tokens, self.correct], dtype=torch.float64)
        return torch.cat([head, self.bins.flatten()]).to(device)

    @classmethod
    def from_tensor(cls, flat: Tensor) -> TokenStats:
        flat = flat.detach().double().cpu()
        return cls(float(flat[0]), int(round(float(flat[1]))), int(round(float(flat[2]))), flat[3:].view(-1, 3).clone())

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Mean cross-entropy per token, next-token accuracy and ECE (NaN when no token was scored)."""
        n = self.tokens
        return {
            f"{prefix}ce": self.ce / n if n else math.nan,
            f"{prefix}token_acc": self.correct / n if n else math.nan,
            f"{prefix}ece": expected_calibration_error(self.bins),
        }


def token_stats(logits: Tensor, labels: Tensor, *, n_bins: int = 10, chunk: int = 4096) -> TokenStats:
    """Cross-entropy, arg-max correctness and calibration sums over the response tokens of a batch.

    logits (B, T, V); labels (B, T) with ``IGNORE_INDEX`` on prompt and padding; position t
    predicts token t + 1. Only the scored positions are taken out, then handled `chunk` rows at a
    time in float32, so no (B, T, V) float32 copy is made.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + (V,)")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    scored = logits[:, :-1][mask]  # (N, V)
    tgt = targets[mask]  # (N,)
    out = TokenStats.zeros(n_bins)
    for a in range(0, tgt.numel(), chunk):
        logp = torch.log_softmax(scored[a : a + chunk].float(), dim=-1)  # (C, V)
        t = tgt[a : a + chunk]
        top_logp, top_id = logp.max(dim=-1)
        correct = top_id == t
        out = out + TokenStats(
            ce=-float(logp.gather(-1, t[:, None]).sum()),
            tokens=int(t.numel()),
            correct=int(correct.sum()),
            bins=calibration_bins(top_logp.exp(), correct, n_bins),
        )
    return out


@torch.no_grad()
def heldout_stats(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    pad_id: int,
    *,
    batch_size: int = 64,
    n_bins: int = 10,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> TokenStats:
    """Cross-entropy, next-token accuracy and calibration sums over the examples' response tokens (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = TokenStats.zeros(n_bins)
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        window = trained_window(batch["labels"])
        with autocast():
            logits = causal_logits(model, batch["input_ids"], batch["attention_mask"], window)  # (B, W, V)
        total = total + token_stats(logits, batch["labels"][:, window], n_bins=n_bins)
    model.train(was_training)
    return total


def ce_sums(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    pad_id: int,
    *,
    batch_size: int = 64,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of response tokens) over tokenised examples, in eval mode."""
    stats = heldout_stats(model, examples, pad_id, batch_size=batch_size, autocast=autocast, n_bins=1)
    return stats.ce, stats.tokens
