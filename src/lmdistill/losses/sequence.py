"""Log-probabilities of given tokens under a causal LM: per token (B, T) and per sequence (B,)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import compute_dtype

_CHUNK_ELEMENTS = 1 << 23  # logits elements upcast at a time (32 MiB in float32)


class _TargetLogprobs(torch.autograd.Function):
    """out[i] = log_softmax(logits[i])[targets[i]] for logits (M, V); float32+ chunk by chunk.

    Saves only the logits (the caller holds them anyway) and the (M,) log-normalisers: no
    (M, V) float32 copy lives between forward and backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        dtype = compute_dtype(logits.dtype)
        rows = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
        out = logits.new_empty(logits.shape[0], dtype=dtype)
        lse = torch.empty_like(out)
        for a in range(0, logits.shape[0], rows):
            x = logits[a : a + rows].to(dtype)
            lse[a : a + rows] = torch.logsumexp(x, dim=-1)
            out[a : a + rows] = x.gather(-1, targets[a : a + rows, None]).squeeze(-1) - lse[a : a + rows]
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        rows = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
        grad = torch.empty_like(logits)
        for a in range(0, logits.shape[0], rows):
            g = grad_out[a : a + rows, None].to(lse.dtype)  # (C, 1)
            # d/dx [x_y − logsumexp(x)] = onehot(y) − softmax(x)
            x = (logits[a : a + rows].to(lse.dtype) - lse[a : a + rows, None]).exp_().mul_(-g)
            x.scatter_add_(-1, targets[a : a + rows, None], g)
            grad[a : a + rows] = x
        return grad, None


def token_logprobs(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Log-probability of each label token under the model, with the causal shift, aligned to ``labels``.

    ``logits[:, t]`` is the prediction for the token at t + 1, so the result at position t ≥ 1 is
    ``log_softmax(logits[:, t − 1])[labels[:, t]]``. Position 0 has no prediction and is 0; so
    is every position whose label is ``ignore_index``. Computed in float32 at least, chunk by
    chunk, without a (B, T, V) float32 copy kept for backward.

    Args:
        logits: (B, T, V) causal-LM logits for the sequence ``labels``.
        labels: (B, T) token ids, ``ignore_index`` where the token does not count (prompt, padding).

    Returns:
        (B, T): log p(labels[:, t] | labels[:, :t]), 0 at t = 0 and at ignored labels.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + (V,)")
    batch, length, vocab = logits.shape
    targets = torch.full_like(labels, ignore_index)  # targets[:, t] = labels[:, t + 1]
    targets[:, :-1] = labels[:, 1:]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).reshape(-1)
    predicted = _TargetLogprobs.apply(logits.reshape(-1, vocab), safe).view(batch, length)  # at logits positions
    predicted = torch.where(valid, predicted, 0.0)
    return torch.cat([predicted.new_zeros(batch, 1), predicted[:, :-1]], dim=1)


def sequence_logprobs(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each sequence's counted tokens, and their number.

    Args: as ``token_logprobs``. Position 0 is never counted (nothing predicts it).

    Returns:
        (logp_sum (B,), n_tokens (B,) long): Σ_t log p(labels[:, t] | labels[:, :t]) over t ≥ 1 with
        labels[:, t] != ignore_index, and the number of such t.
    """
    per_token = token_logprobs(logits, labels, ignore_index=ignore_index)
    n_tokens = (labels[:, 1:] != ignore_index).sum(dim=1)
    return per_token.sum(dim=1), n_tokens


def prediction_mask(labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """(B, T) bool: position t predicts a trained token (labels[:, t + 1] is not ignored); the last is False."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def trained_window(labels: Tensor, *, ignore_index: int = -100) -> slice:
    """The positions of (B, T) `labels` whose logits a loss on them needs, as one slice of T.

    From the position before the first column holding a trained label to the last such column
    (position t predicts labels[:, t + 1]). Logits at ``window`` with ``labels[:, window]`` give every
    loss on the rows exactly what the whole (B, T) rows give, at (hi − lo)/T of the output head's
    cost: prompt and trailing padding columns are cut (one wasted position, the window's last). With
    no trained label anywhere it is the whole row.
    """
    cols = (labels != ignore_index).any(0).nonzero()
    if len(cols) == 0:
        return slice(0, labels.shape[1])
    return slice(max(int(cols[0]) - 1, 0), int(cols[-1]) + 1)


def response_ce_sum(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Cross-entropy summed over trained tokens (scalar, float32). logits (B, T, V), labels (B, T).

    Position t predicts labels[:, t + 1]; tokens labelled `ignore_index` (prompt, padding) are left out.
    """
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=ignore_index, reduction="sum"
    )
