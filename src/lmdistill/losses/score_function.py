"""Score-function (REINFORCE) estimator of the sequence-level reverse KL from sampled-token log-probs.

For a teacher that gives only log q_t(y_t), the log-prob of each token actually in the sequence
(``Teacher.score``), the reverse KL along the student's own samples (seed 000's on-policy term,
METHODS.md "Feedback KL") can only be estimated. With r_t = log s_t(y_t) − log q_t(y_t):

    KL(p_s ‖ p_q) = E_{y~p_s}[Σ_t r_t]
    ∇KL = E_y[Σ_t ∇log s_t(y_t) · R_t],   R_t = Σ_{t' ≥ t} r_t'  (the return from t)

(Williams 1992, REINFORCE). The direct term E[Σ_t ∇log s_t(y_t)] vanishes (E[∇log s] = 0), and so
do the past rewards r_{t'<t} times ∇log s_t (causality: given y_<t they are constants). A baseline
b_t that does not depend on the row's own sample leaves the expectation unchanged; here b at
(row i, position t) is the mean return of the *other* rows that count at t — a leave-one-out
baseline (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; RLOO, Ahmadian
et al. 2024), taken per position instead of per sequence.

Per-token tensors are label-aligned, as :func:`lmdistill.losses.token_logprobs` and
``Teacher.score`` return them: position t holds the quantity of token y_t given y_<t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import compute_dtype


def leave_one_out_baseline(values: Tensor, mask: Tensor) -> Tensor:
    """b[i, t] = mean of values[j, t] over the rows j ≠ i with mask[j, t]; (B, T) → (B, T).

    0 where no other row counts at t, and at masked positions. Rows are the independent samples,
    so b[i] depends on row i's sample not at all (only on mask[i, t] through the count, which is
    settled by y_<t).
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    v = torch.where(mask, values, 0.0)
    m = mask.to(v.dtype)
    others = m.sum(0, keepdim=True) - m  # (B, T) rows other than i that count at t
    baseline = (v.sum(0, keepdim=True) - v) / others.clamp(min=1)
    return torch.where(mask, baseline, 0.0)


def score_function_rkl(
    student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, *, baseline: bool = True
) -> tuple[Tensor, Tensor]:
    """Sampled estimate of the reverse KL summed over a batch of samples, carrying the score-function gradient.

    value = Σ_{i,t} m_it·r_it, with r = log s − log q (an unbiased estimate of B·KL(p_s ‖ p_q)
    over the batch's B independent samples y ~ p_s), and

    ∇value = Σ_{i,t} m_it·(R_it − b_it)·∇log s_t(y_it),   R_it = Σ_{t' ≥ t} m_it'·r_it'

    whose expectation is B·∇KL(p_s ‖ p_q) (module docstring). b is :func:`leave_one_out_baseline`
    of R, or 0 with ``baseline=False``. The value is not the surrogate Σ (R − b)·log s (that has
    no meaning); it is the surrogate minus its own value plus Σ r.

    Args:
        student_logprobs: (B, T) log s_t(y_t) of the sampled tokens, with gradient
            (``token_logprobs(student_logits, labels)``).
        teacher_logprobs: (B, T) log q_t(y_t) of the same tokens (``Teacher.score``); no gradient taken.
        mask: (B, T) bool, True on the sampled (response) tokens (``labels != ignore_index``).
            Masked positions of either input never reach the result, even NaN or inf.
        baseline: subtract the leave-one-out baseline (needs B ≥ 2 to do anything).

    Returns:
        (value_sum, n_tokens): a float32 (at least) scalar as above, and mask.sum() (int64 scalar).
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if student_logprobs.shape != mask.shape or teacher_logprobs.shape != mask.shape:
        raise ValueError(
            f"student_logprobs {tuple(student_logprobs.shape)}, teacher_logprobs {tuple(teacher_logprobs.shape)} "
            f"and mask {tuple(mask.shape)} must have one (B, T) shape"
        )
    dtype = compute_dtype(student_logprobs.dtype, teacher_logprobs.dtype)
    s = torch.where(mask, student_logprobs.to(dtype), 0.0)
    with torch.no_grad():
        r = torch.where(mask, s.detach() - teacher_logprobs.detach().to(dtype), 0.0)  # (B, T)
        returns = torch.where(mask, r.flip(1).cumsum(1).flip(1), 0.0)  # R_t = Σ_{t' ≥ t} r_t'
        advantages = returns - leave_one_out_baseline(returns, mask) if baseline else returns
    surrogate = (s * advantages).sum()
    return surrogate - surrogate.detach() + r.sum(), mask.sum()
