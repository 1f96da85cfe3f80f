"""Divergences between a student and a teacher whose vocabularies differ (METHODS.md, "different tokenizers").

Notation: s = softmax(z_S/τ) over the student's V_S tokens, q = softmax(z_T/τ) over the teacher's V_T.

**ULD** (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
loss"). The two distributions live on different supports; ULD stands in for the Wasserstein-1 distance
between them by the paper's closed form: sort both vectors in decreasing order, pad the shorter with
zeros to V = max(V_S, V_T), and sum the absolute differences rank by rank::

    ULD(s, q) = Σ_{i=1..V} | s_(i) − q_(i) |        (s_(1) ≥ s_(2) ≥ ..., likewise q)

It ignores which token carries the mass (0 for any permutation of the same probabilities), so it needs
no vocabulary map; it is used with cross-entropy on the data. Positions are aligned by index: the i-th
response token of the student against the i-th of the teacher (:func:`uld`).

**Span alignment** (GOLD's hybrid idea, TRL; MinED's alignment in FuseLLM). Both tokenizations of the
same response are aligned by character offsets into groups (``lmdistill.data.align``):

- a *one-to-one* group (one token each side, the same text, and the same text before it): the two
  next-token distributions are compared on the M tokens both vocabularies hold (pairs of ids with the
  same bytes), each renormalised over them — s̃_m = s(σ_m)/Σ_M s, q̃_m = q(τ_m)/Σ_M q — with any registered
  divergence (the caller indexes both logit vectors with the paired ids; a softmax over them is that
  renormalisation). Our choice over a top-k-style tail bucket for the rest: mass on tokens the other side
  lacks cannot be moved by training (a student whose every token the teacher also holds has an empty
  tail, and the tail term would be a constant); what those tokens spell is compared by the span term;
- a *merged* group (several tokens on at least one side covering the same characters): the span's
  log-probability on each side is the sum of its tokens' log-probabilities, log P = Σ_i log p(y_i | y_<i),
  and the divergence is taken between the two-point distributions (P_T, 1 − P_T) and (P_S, 1 − P_S)
  (:func:`span_divergence`). Our choice: this keeps every divergence proper (0 iff P_S = P_T) and on the
  same footing as the one-to-one term (a span's probability is a product of conditionals that a
  single distribution of either model does not hold); for fkl it is
  P_T·log(P_T/P_S) + (1 − P_T)·log((1 − P_T)/(1 − P_S)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import Reduction, append_tail, compute_dtype, masked_reduce
from .divergences import get_kernel


def uld(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, temperature: float = 1.0,
        reduction: Reduction = "mean") -> Tensor:
    """ULD: Σ_i |sort(s)_i − sort(q)_i| per position, the shorter vocabulary padded with zeros (module docstring).

    Args:
        student_logits: (..., V_S); teacher_logits: (..., V_T), the same leading shape (position-aligned).
        mask: (...) bool, True where the position counts.
        temperature: τ dividing both models' logits.
        reduction: "mean" over the counted positions (0 with none), "sum", or "none" ((...), 0 where masked).
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)} and mask "
                         f"{tuple(mask.shape)} must share their leading dimensions")
    dtype = compute_dtype(student_logits.dtype, teacher_logits.dtype)
    s = torch.softmax(student_logits[mask].to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    q = torch.softmax(teacher_logits[mask].to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(s.shape[-1], q.shape[-1])
    s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    selected = (s - q).abs().sum(-1)
    values = selected.new_zeros(mask.shape).index_put((mask,), selected)
    return masked_reduce(values, mask, reduction)


def span_divergence(name: str, student_logp: Tensor, teacher_logp: Tensor, mask: Tensor, *,
                    reduction: Reduction = "mean", **params: float) -> Tensor:
    """The divergence `name` between the two-point distributions (P, 1 − P) of each span (module docstring).

    student_logp, teacher_logp: (...) log-probabilities of the same text spans (sums of token log-probs);
    mask: (...) bool, the spans that count. The student's P is clamped below 1 by machine epsilon (as the
    tail bucket of a top-k teacher is), so the gradient stays finite at P = 1.
    """
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(f"span log-probs {tuple(student_logp.shape)} and {tuple(teacher_logp.shape)} differ in shape")
    dtype = compute_dtype(student_logp.dtype, teacher_logp.dtype)
    s = append_tail(torch.where(mask, student_logp, -1.0).to(dtype).unsqueeze(-1))  # (..., 2)
    t = append_tail(torch.where(mask, teacher_logp, -1.0).to(dtype).unsqueeze(-1))
    return masked_reduce(get_kernel(name)(s, t, **params), mask, reduction)
