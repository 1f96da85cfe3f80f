"""Pieces shared by every loss: the top-k teacher type, the masked reduction, and the map from
(student logits, teacher) to two log-distributions over the same support."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]


class TopK(NamedTuple):
    """A teacher known only on k token ids per position (a top-k cache, or an API's log-probs).

    ids: LongTensor (B, T, k), token ids in [0, V).
    logprobs: FloatTensor (B, T, k), the teacher's log-probabilities of those ids under its full
        softmax over V (so ``logprobs.exp().sum(-1) <= 1``; the rest is the tail mass).
    tail_ids: optional LongTensor (B, T, n): n ids drawn from the teacher's distribution restricted
        to its tail (the ids outside ``ids``), by systematic sampling (:func:`sample_tail`).
    tail_plogp: optional FloatTensor (B, T): Σ_tail q·log q, the teacher's exact tail term.

    Without the tail fields the losses merge the tail into one bucket, which makes ``fkl`` a lower
    bound of the full value (log-sum inequality). With them ``fkl`` estimates the tail term without
    bias: Σ_tail q·log(q/s) = tail_plogp − (tail mass / n)·Σ_i log s(tail_ids_i) in expectation, and
    so does its gradient. The other divergences use the bucket either way.
    """

    ids: Tensor
    logprobs: Tensor
    tail_ids: Tensor | None = None
    tail_plogp: Tensor | None = None

    @property
    def sampled(self) -> bool:
        """Whether this teacher carries tail samples (see the class docstring)."""
        return self.tail_ids is not None

    def select(self, where: Tensor) -> TopK:
        """The positions ``where`` selects (a bool mask over the leading dims, or an index), every field."""
        if not self.sampled:
            return TopK(self.ids[where], self.logprobs[where])
        return TopK(self.ids[where], self.logprobs[where], self.tail_ids[where], self.tail_plogp[where])


@torch.no_grad()
def sample_tail(teacher_logp: Tensor, k: int, n: int, generator: torch.Generator | None = None) -> TopK:
    """The teacher's top-k plus n systematic samples from its tail, from full log-probs (N, V).

    Systematic sampling: the tail (ids outside the top k) is sorted by probability and cut at the
    n points (u + i)/n, i = 0..n−1, u ~ U[0, 1) of its normalised cumulative mass; each point picks
    one id. Every id is picked q_v / tail·n times in expectation (so the estimator in ``TopK`` is
    unbiased), and high-mass tail ids are picked almost surely, which keeps its variance far below
    that of independent draws. Returns TopK with ids/logprobs (N, k), tail_ids (N, n) and
    tail_plogp (N,). A position without tail mass gets tail_plogp 0 and weightless samples.
    """
    if teacher_logp.dim() != 2:
        raise ValueError(f"teacher_logp must be (N, V), got {tuple(teacher_logp.shape)}")
    if not 1 <= k < teacher_logp.shape[-1] or n < 1:
        raise ValueError(f"need 1 <= k < V and n >= 1, got k={k}, n={n}, V={teacher_logp.shape[-1]}")
    logp = teacher_logp.float()
    top_lp, top_ids = logp.topk(k, dim=-1)  # (N, k), best first
    tail_logp = logp.scatter(-1, top_ids, -math.inf)  # (N, V)
    q = tail_logp.exp()
    plogp = (q * tail_logp.masked_fill(q == 0, 0.0)).sum(-1)  # (N,)
    q_sorted, order = q.sort(dim=-1, descending=True)
    cdf = q_sorted.cumsum(-1)
    cdf = cdf / cdf[:, -1:].clamp(min=torch.finfo(cdf.dtype).tiny)
    u = torch.rand(logp.shape[0], 1, generator=generator, device=logp.device)
    points = (u + torch.arange(n, device=logp.device)) / n  # (N, n), increasing
    pos = torch.searchsorted(cdf, points).clamp(max=logp.shape[-1] - 1)
    return TopK(top_ids, top_lp, order.gather(-1, pos), plogp)


Teacher = Tensor | TopK


def resolve_reduction(per_token: bool, reduction: Reduction) -> Reduction:
    """``per_token=True`` is ``reduction="none"``; asking for both a per-token and a "sum" result is an error."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if per_token:
        if reduction == "sum":
            raise ValueError("per_token=True contradicts reduction='sum'; pass one of them")
        return "none"
    return reduction


def masked_reduce(values: Tensor, mask: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Reduce per-position ``values`` over the positions where ``mask`` is True.

    values: (B, T) (any shape equal to ``mask.shape``); mask: (B, T) bool.
    "mean": sum over unmasked positions / their count, and exactly 0 (not NaN) when there are none.
    "sum": sum over unmasked positions (for a loop that normalises by a global token count).
    "none": ``values`` with masked positions set to 0, shape (B, T).
    Masked positions never reach the result, even if they hold NaN or inf.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    values = torch.where(mask, values, 0.0)
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 at least: bf16/fp16 are upcast, float64 stays float64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate at both ends (Mächler 2012): log(−expm1(x)) near 0, log1p(−eˣ) far from it."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def append_tail(logp: Tensor) -> Tensor:
    """Append one bucket holding the mass not on the k ids: (..., k) log-probs → (..., k+1).

    tail = log(1 − Σ_k p) = log1mexp(logsumexp(logp)). The k-sum is clamped to at most 1 − eps
    (eps = machine epsilon of the dtype), so a rounding excess over 1 (k = V, or a cache stored
    in low precision) gives a tail of ~eps instead of NaN; the clamp also stops the gradient of
    a mass that is 1 up to rounding.
    """
    eps = torch.finfo(logp.dtype).eps
    lse = torch.logsumexp(logp, dim=-1, keepdim=True).clamp(max=math.log1p(-eps))
    return torch.cat([logp, log1mexp(lse)], dim=-1)


def log_distributions(
    student_logits: Tensor, teacher: Teacher, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Turn student logits and a teacher into ``(student_logp, teacher_logp)`` over one support.

    student_logits: (..., V). teacher: logits (..., V), or ``TopK`` with ids/logprobs (..., k).
    Returns two tensors of log-probabilities, float32 at least (float64 stays float64):
    - dense teacher: ``log_softmax(logits / τ)`` of both, shape (..., V);
    - ``TopK`` teacher: the student's log-probs (log_softmax over all V) gathered at the k ids,
      and the teacher's given log-probs, each followed by one tail bucket with that side's
      remaining mass, shape (..., k+1). With k = V (all ids) this is the dense pair plus an
      empty (~eps) bucket on each side, which changes no divergence by more than ~eps.

    Temperature τ divides the logits of both models. A ``TopK`` teacher requires τ = 1: its
    logprobs are a fixed distribution, and its tempered version softmax(z/τ) cannot be rebuilt
    from the top k (the normaliser needs the tail logits). To distil at τ ≠ 1 from a top-k
    cache, build the cache from ``log_softmax(teacher_logits / τ)`` and pass
    ``student_logits / τ`` with ``temperature=1``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher, TopK):
        ids, logprobs = teacher.ids, teacher.logprobs
        if temperature != 1.0:
            raise ValueError(
                "a TopK teacher needs temperature=1.0: its log-probs cannot be re-tempered without the "
                "tail logits; build the cache at temperature τ and pass student_logits / τ instead"
            )
        if ids.shape != logprobs.shape or ids.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"TopK ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must both be "
                f"{tuple(student_logits.shape[:-1])} + (k,)"
            )
        if ids.dtype != torch.long:
            raise TypeError(f"TopK ids must be int64, got {ids.dtype}")
        dtype = compute_dtype(student_logits.dtype, logprobs.dtype)
        s = student_logits.to(dtype)
        student_k = s.gather(-1, ids) - torch.logsumexp(s, dim=-1, keepdim=True)  # (..., k)
        return append_tail(student_k), append_tail(logprobs.to(dtype))
    if teacher.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} must match student logits {tuple(student_logits.shape)}"
        )
    dtype = compute_dtype(student_logits.dtype, teacher.dtype)
    s, t = student_logits.to(dtype), teacher.to(dtype)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    return torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
