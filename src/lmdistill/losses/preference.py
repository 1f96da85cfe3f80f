"""Preference losses on per-sequence log-probabilities: DPKD and its preference-form variants.

DPKD (Li et al., "Direct Preference Knowledge Distillation for LLMs"; METHODS.md): the reward
implicit in ``max E[r] − β·KL(p_θ‖p_T)`` is ``r(x, y) = β·log(p_θ(y|x)/p_T(y|x)) + β·log Z(x)``;
the Bradley–Terry probability that the teacher's output y_w beats the student's y_l gives

    h = log p_θ(y_w)/p_T(y_w) − log p_θ(y_l)/p_T(y_l)       (log Z cancels)
    L = −log σ(β·h)                                           (each log-ratio / |y| if length-normalised)

which is DPO (Rafailov et al. 2023) with the teacher as the reference model. The variants
(IPO, CPO, SimPO) are the preference forms of the paper's §4.4.

Inputs are per-sequence log-prob sums (B,) (see ``sequence_logprobs``); every function returns
``(loss, metrics)``: the loss is the mean over the batch (float32 at least), and the metrics are
detached scalars (batch means): ``reward_chosen``, ``reward_rejected``, ``reward_margin``
(chosen − rejected) and ``reward_accuracy`` (fraction with reward_chosen > reward_rejected).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._common import compute_dtype

Metrics = dict[str, Tensor]


def _float(x: Tensor) -> Tensor:
    return x.to(compute_dtype(x.dtype))


def _log_ratio(policy: Tensor, reference: Tensor, length: Tensor | None, length_normalize: bool, which: str) -> Tensor:
    ratio = _float(policy) - _float(reference)
    if length_normalize:
        if length is None:
            raise ValueError(f"length_normalize=True needs {which}_len")
        ratio = ratio / length.to(ratio.dtype).clamp(min=1)
    return ratio


def _metrics(reward_chosen: Tensor, reward_rejected: Tensor) -> Metrics:
    reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
    return {
        "reward_chosen": reward_chosen.mean(),
        "reward_rejected": reward_rejected.mean(),
        "reward_margin": (reward_chosen - reward_rejected).mean(),
        "reward_accuracy": (reward_chosen > reward_rejected).to(reward_chosen.dtype).mean(),
    }


def dpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float = 0.1,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
    length_normalize: bool = False,
) -> tuple[Tensor, Metrics]:
    """DPO (Rafailov et al. 2023): −log σ(β·h), h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l).

    Args:
        policy_chosen, policy_rejected: (B,) log p_θ(y_w|x), log p_θ(y_l|x) (sums over tokens).
        reference_chosen, reference_rejected: (B,) the same under the frozen reference model.
        beta: β, the inverse strength of the KL regularisation.
        chosen_len, rejected_len: (B,) token counts |y_w|, |y_l|; needed with length_normalize.
        length_normalize: divide each log-ratio by its sequence length.

    Returns:
        (loss, metrics); rewards are β·log-ratio (length-normalised if asked).
    """
    chosen = _log_ratio(policy_chosen, reference_chosen, chosen_len, length_normalize, "chosen")
    rejected = _log_ratio(policy_rejected, reference_rejected, rejected_len, length_normalize, "rejected")
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, _metrics(beta * chosen, beta * rejected)


def dpkd(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    teacher_chosen: Tensor,
    teacher_rejected: Tensor,
    *,
    beta: float = 0.1,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
    length_normalize: bool = False,
) -> tuple[Tensor, Metrics]:
    """DPKD (Li et al. 2024) stage 2: −log σ(β·h), h = log p_θ(y_w)/p_T(y_w) − log p_θ(y_l)/p_T(y_l).

    y_w is the teacher's output, y_l the student's sample; the teacher is the reference, so the
    rewards β·log(p_θ/p_T) are the implicit rewards of the paper (Fig. 2–3). With
    ``length_normalize`` each log-ratio is divided by its |y| (the paper's length normalisation).
    With the student equal to the teacher, h = 0 and the loss is log 2.

    Args: as ``dpo``, with teacher_chosen/teacher_rejected (B,) = log p_T(y_w|x), log p_T(y_l|x).
    Returns: (loss, metrics).
    """
    return dpo(
        policy_chosen,
        policy_rejected,
        teacher_chosen,
        teacher_rejected,
        beta=beta,
        chosen_len=chosen_len,
        rejected_len=rejected_len,
        length_normalize=length_normalize,
    )


def ipo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float = 0.1,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
    length_normalize: bool = False,
) -> tuple[Tensor, Metrics]:
    """IPO (Azar et al. 2024): (h − 1/(2β))², h as in ``dpo``/``dpkd`` (reference = teacher for KD).

    Args and returns as ``dpo``; rewards are β·log-ratio.
    """
    chosen = _log_ratio(policy_chosen, reference_chosen, chosen_len, length_normalize, "chosen")
    rejected = _log_ratio(policy_rejected, reference_rejected, rejected_len, length_normalize, "rejected")
    loss = ((chosen - rejected - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _metrics(beta * chosen, beta * rejected)


def cpo(policy_chosen: Tensor, policy_rejected: Tensor, *, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """CPO (Xu et al. 2024): −log σ(β·(log p_θ(y_w) − log p_θ(y_l))) − log p_θ(y_w); no reference term.

    Args:
        policy_chosen, policy_rejected: (B,) log p_θ(y_w|x), log p_θ(y_l|x) (sums over tokens).
        beta: β.
    Returns:
        (loss, metrics); rewards are β·log p_θ(y).
    """
    chosen, rejected = _float(policy_chosen), _float(policy_rejected)
    loss = (-F.logsigmoid(beta * (chosen - rejected)) - chosen).mean()
    return loss, _metrics(beta * chosen, beta * rejected)


def simpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[Tensor, Metrics]:
    """SimPO (Meng et al. 2024): −log σ(β/|y_w|·log p_θ(y_w) − β/|y_l|·log p_θ(y_l) − γ); no reference.

    Args:
        policy_chosen, policy_rejected: (B,) log p_θ(y_w|x), log p_θ(y_l|x) (sums over tokens).
        chosen_len, rejected_len: (B,) |y_w|, |y_l| (token counts, clamped at 1).
        beta: β; gamma: γ, the target reward margin.
    Returns:
        (loss, metrics); rewards are β/|y|·log p_θ(y) (the margin excludes γ).
    """
    chosen = beta * _float(policy_chosen) / chosen_len.to(compute_dtype(policy_chosen.dtype)).clamp(min=1)
    rejected = beta * _float(policy_rejected) / rejected_len.to(compute_dtype(policy_rejected.dtype)).clamp(min=1)
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    return loss, _metrics(chosen, rejected)

