"""MiniLLM's policy gradient on the sequence-level reverse KL (Gu et al. 2024, seed 002; METHODS.md).

Objective: minimise KL(p_θ ‖ p_T) over whole responses, i.e. maximise E_{y~p_θ}[Σ_t r_t] with the
per-token reward r_t = log q_t(y_t) − log s_t(y_t) (teacher q, student s). Its gradient splits
(paper Eq. 5) into

- the **single-step part** ∇ Σ_t KL(s_t ‖ q_t), the exact reverse KL over the vocabulary at every
  prefix of the sample, differentiated w.r.t. that step's distribution only (``rkl`` of the loss
  library), which removes the variance of the current step's reward; and
- the **long part**, a policy gradient −Σ_t R_{t+1} ∇log s_t(y_t) with the future return
  R_{t+1} = Σ_{t'>t} r_t', length-normalised to a mean over the T − t − 1 future tokens (Eq. 7).

Teacher-mixed sampling draws y from p̃ = α·q + (1−α)·s; each token's gradient is reweighted by
w_t = s_t(y_t) / p̃_t(y_t) (Eq. 8, the per-token approximation), and the weighted ratio is clipped
as in PPO (``ppo_clip_loss``).

``rloo_loss`` is REINFORCE against a scalar reward of whole sequences with the leave-one-out baseline
over k samples per prompt (RLAIF against a distilled reward model).

Per-token tensors here are aligned to the labels, as :func:`token_logprobs` returns them: position
t holds the quantity of token y_t given y_<t; ``mask`` (B, T) bool marks the response tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import compute_dtype
from .divergences import rkl
from .score_function import leave_one_out_baseline
from .sequence import token_logprobs


def teacher_mixed_logprobs(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """log p̃ = log(α·q + (1−α)·s), elementwise, from log-probabilities of the same events (any shape).

    Computed in log space (logaddexp); α = 0 gives ``student_logp`` and α = 1 ``teacher_logp`` exactly.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return student_logp
    if alpha == 1.0:
        return teacher_logp
    return torch.logaddexp(teacher_logp + math.log(alpha), student_logp + math.log1p(-alpha))


def future_returns(rewards: Tensor, mask: Tensor, *, length_normalize: bool = True) -> Tensor:
    """R_{t+1} = Σ_{t'>t} r_t' over the masked positions after t, per position t (B, T).

    With ``length_normalize`` the sum is divided by the number of those positions (T − t − 1 for a
    response of length T indexed from 0), so it is the mean future reward; 0 where none follow.
    Unmasked positions are 0 and contribute nothing.
    """
    if rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} differ in shape")
    r = torch.where(mask, rewards, 0.0)
    m = mask.to(r.dtype)
    # Reverse cumulative sums include position t itself; subtracting it leaves the strict future.
    future = r.flip(1).cumsum(1).flip(1) - r
    if not length_normalize:
        return torch.where(mask, future, 0.0)
    count = m.flip(1).cumsum(1).flip(1) - m
    return torch.where(mask & (count > 0), future / count.clamp(min=1), 0.0)


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values − mean) / sqrt(var + eps) over the masked positions (population variance); 0 elsewhere."""
    n = mask.sum().clamp(min=1)
    mean = torch.where(mask, values, 0.0).sum() / n
    var = torch.where(mask, (values - mean) ** 2, 0.0).sum() / n
    return torch.where(mask, (values - mean) * torch.rsqrt(var + eps), 0.0)


def ppo_clip_loss(logprobs: Tensor, weights: Tensor, advantages: Tensor, mask: Tensor, *, clip: float = 0.2) -> Tensor:
    """Per-token clipped surrogate max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(log s − sg(log s))·w; (B, T).

    The samples are used for one update, so the "old" policy is the current one detached: ρ equals
    the importance weight w in value and has the gradient w·∇log s. As in PPO, a token whose
    ratio has left [1−ε, 1+ε] in the direction its advantage pushes gets no gradient.

    Args:
        logprobs: (B, T) log s_t(y_t) of the sampled tokens, with gradient.
        weights: (B, T) importance weights w_t = s_t(y_t) / p̃_t(y_t), no gradient.
        advantages: (B, T) A_t (here the normalised future return), no gradient.
        mask: (B, T) bool, True on response tokens; other positions return 0.
        clip: ε > 0.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    ratio = torch.exp(logprobs - logprobs.detach()) * weights.detach()
    advantages = advantages.detach()
    surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))
    return torch.where(mask, surrogate, 0.0)


def minillm_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    mix_alpha: float = 0.2,
    clip: float = 0.2,
    length_normalize: bool = True,
    whiten_advantages: bool = True,
    single_step_weight: float = 1.0,
    pg_weight: float = 1.0,
    ignore_index: int = -100,
) -> tuple[Tensor, dict[str, float]]:
    """MiniLLM's loss on sampled responses, **summed** over their tokens, and statistics as sums.

    loss = single_step_weight · Σ_t KL(s_t ‖ q_t)  +  pg_weight · Σ_t ppo_clip(w_t, A_t)

    where the per-step KL runs over the whole vocabulary (exact), A_t is the (length-normalised,
    optionally whitened) future return of the rewards r_t = log q_t(y_t) − log s_t(y_t), and
    w_t = s_t(y_t) / (α·q_t(y_t) + (1−α)·s_t(y_t)) corrects for teacher-mixed sampling (α = 0:
    pure student samples, w = 1). On a one-token response the long part vanishes and the
    gradient is exactly ∇KL(s‖q) of that step.

    Args:
        student_logits: (B, T, V) student logits on the sampled sequences (with gradient).
        teacher_logits: (B, T, V) teacher logits on the same sequences.
        labels: (B, T) the sequences with prompt and padding set to ``ignore_index``.

    Returns:
        (loss_sum, stats): stats holds sums over the response tokens — ``single_step_rkl``,
        ``pg_loss``, ``reward`` (Σ r_t: minus the sampled estimate of the sequence reverse KL),
        ``importance_weight``, ``clip_frac`` (tokens whose ratio is outside [1−ε, 1+ε]) — and ``tokens``.
    """
    mask = labels != ignore_index
    mask[:, 0] = False  # nothing predicts the first token
    predicting = torch.zeros_like(mask)
    predicting[:, :-1] = mask[:, 1:]  # logits position t − 1 predicts label position t
    single = rkl(student_logits, teacher_logits, predicting, reduction="sum")

    dtype = compute_dtype(student_logits.dtype, teacher_logits.dtype)
    student_lp = token_logprobs(student_logits, labels, ignore_index=ignore_index).to(dtype)  # (B, T)
    with torch.no_grad():
        teacher_lp = token_logprobs(teacher_logits.detach(), labels, ignore_index=ignore_index).to(dtype)
        old_lp = student_lp.detach()
        rewards = torch.where(mask, teacher_lp - old_lp, 0.0)
        log_w = old_lp - teacher_mixed_logprobs(old_lp, teacher_lp, mix_alpha)
        weights = torch.where(mask, log_w.exp(), 0.0)
        advantages = future_returns(rewards, mask, length_normalize=length_normalize)
        if whiten_advantages:
            advantages = whiten(advantages, mask)
    pg = ppo_clip_loss(student_lp, weights, advantages, mask, clip=clip).sum()

    loss = single_step_weight * single + pg_weight * pg
    outside = mask & ((weights < 1.0 - clip) | (weights > 1.0 + clip))
    stats = {
        "single_step_rkl": float(single.detach()),
        "pg_loss": float(pg.detach()),
        "reward": float(rewards.sum()),
        "importance_weight": float(weights.sum()),
        "clip_frac": float(outside.sum()),
        "tokens": float(mask.sum()),
    }
    return loss, stats


def rloo_loss(
    seq_logprobs: Tensor,
    scores: Tensor,
    reference_logprobs: Tensor | None = None,
    *,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE leave-one-out (Kool et al. 2019; RLOO, Ahmadian et al. 2024, Eq. 5) on k samples per prompt.

    Each sample y_ij ~ p_θ(·|x_i) (j = 1..k) gets one reward at its end, the reward model's score minus the
    KL penalty to a reference model, summed over its tokens (the sampled estimate of KL(p_θ ‖ p_ref)):

        R_ij = score_ij − kl_coef · (log p_θ(y_ij|x_i) − log p_ref(y_ij|x_i))        (no gradient)
        A_ij = R_ij − (1/(k−1)) Σ_{l≠j} R_il                                          (leave one out)
        value = −(1/k) Σ_ij R_ij,   ∇value = −(1/k) Σ_ij A_ij ∇log p_θ(y_ij|x_i)

    The baseline of y_ij depends only on the other samples, so E[∇value] = −Σ_i ∇E_{y~p_θ}[R(x_i, y)]:
    unbiased, the penalty's own dependence on θ included (its score-function part has expectation 0).

    Args:
        seq_logprobs: (P, k) log p_θ(y_ij|x_i) summed over each sample's tokens, with gradient; k ≥ 2.
        scores: (P, k) the reward model's score of each sample (no gradient taken).
        reference_logprobs: (P, k) log p_ref(y_ij|x_i) (no gradient); needed when kl_coef > 0.
        kl_coef: β of the KL penalty.

    Returns:
        (loss, stats): loss summed over the P prompts (a float32+ scalar; the mean over a prompt's k samples),
        stats as sums over the P·k samples: ``score``, ``kl`` (the sampled sequence KL), ``reward`` (R).
    """
    if seq_logprobs.dim() != 2 or seq_logprobs.shape != scores.shape:
        raise ValueError(f"seq_logprobs {tuple(seq_logprobs.shape)} and scores {tuple(scores.shape)} must be one "
                         "(prompts, k) shape")
    k = seq_logprobs.shape[1]
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs k >= 2 samples per prompt, got {k}")
    if kl_coef != 0 and reference_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs the reference model's log-probs")
    dtype = compute_dtype(seq_logprobs.dtype, scores.dtype)
    logp = seq_logprobs.to(dtype)
    with torch.no_grad():
        kl = logp.detach() - reference_logprobs.to(dtype) if reference_logprobs is not None else torch.zeros_like(logp)
        rewards = scores.detach().to(dtype) - kl_coef * kl  # (P, k)
        ones = torch.ones_like(rewards, dtype=torch.bool)
        advantages = rewards - leave_one_out_baseline(rewards.T, ones.T).T  # (P, k)
    surrogate = -(advantages * logp).sum() / k
    value = -rewards.sum() / k
    stats = {"score": float(scores.detach().sum()), "kl": float(kl.sum()), "reward": float(rewards.sum())}
    return surrogate - surrogate.detach() + value, stats
