"""Preference losses on per-sequence log-probabilities: DPKD and its preference-form variants.

DPKD (Li et al., "Direct Preference Knowledge Distillation for LLMs"; METHODS.md): the reward
implicit in ``max E[r] − β·KL(p_θ‖p_T)`` is ``r(x, y) = β·log(p_θ(y|x)/p_T(y|x)) + β·log Z(x)``;
the Bradley–Terry probability that the teacher's output y_w beats the student's y_l gives

    h = log p_θ(y_w)/p_T(y_w) − log p_θ(y_l)/p_T(y_l)       (log Z cancels)
    L = −log σ(β·h)                                           (each log-ratio / |y| if length-normalised)

which is DPO (Rafailov et al. 2023) with the teacher as the reference model. The variants
(IPO, CPO, SimPO) are the preference forms of the paper's §4.4. ``bradley_terry`` is the pairwise
likelihood they share (a reward model's loss); ``plackett_luce`` its listwise extension and ``pro``
the listwise form on a ranking of K responses (registry ``LISTWISE_FORMS``).

Inputs are per-sequence log-prob sums (B,) (see ``sequence_logprobs``); every function returns
``(loss, metrics)``: the loss is the mean over the batch (float32 at least), and the metrics are
detached scalars (batch means): ``reward_chosen``, ``reward_rejected``, ``reward_margin``
(chosen − rejected) and ``reward_accuracy`` (fraction with reward_chosen > reward_rejected).
With ``reduction="sum"`` the loss and every metric are sums over the B pairs instead (B times
the mean), for a training loop that normalises once by its own count.

``PREFERENCE_FORMS`` maps each form's name to the same function behind one signature
(:class:`PreferenceForm`), so a method picks a form by name; ``NEEDS_REFERENCE`` names the forms
that take the reference model's log-probs.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import compute_dtype

Metrics = dict[str, Tensor]
PairReduction = Literal["mean", "sum"]


def _float(x: Tensor) -> Tensor:
    return x.to(compute_dtype(x.dtype))


def _log_ratio(policy: Tensor, reference: Tensor, length: Tensor | None, length_normalize: bool, which: str) -> Tensor:
    ratio = _float(policy) - _float(reference)
    if length_normalize:
        if length is None:
            raise ValueError(f"length_normalize=True needs {which}_len")
        ratio = ratio / length.to(ratio.dtype).clamp(min=1)
    return ratio


def _reduce(per_pair: Tensor, reduction: PairReduction) -> Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _metrics(reward_chosen: Tensor, reward_rejected: Tensor, reduction: PairReduction = "mean") -> Metrics:
    reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
    return {
        "reward_chosen": _reduce(reward_chosen, reduction),
        "reward_rejected": _reduce(reward_rejected, reduction),
        "reward_margin": _reduce(reward_chosen - reward_rejected, reduction),
        "reward_accuracy": _reduce((reward_chosen > reward_rejected).to(reward_chosen.dtype), reduction),
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
    reduction: PairReduction = "mean",
) -> tuple[Tensor, Metrics]:
    """DPO (Rafailov et al. 2023): −log σ(β·h), h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l).

    Args:
        policy_chosen, policy_rejected: (B,) log p_θ(y_w|x), log p_θ(y_l|x) (sums over tokens).
        reference_chosen, reference_rejected: (B,) the same under the frozen reference model.
        beta: β, the inverse strength of the KL regularisation.
        chosen_len, rejected_len: (B,) token counts |y_w|, |y_l|; needed with length_normalize.
        length_normalize: divide each log-ratio by its sequence length.
        reduction: "mean" over the pairs, or "sum" (loss and metrics alike).

    Returns:
        (loss, metrics); rewards are β·log-ratio (length-normalised if asked).
    """
    chosen = _log_ratio(policy_chosen, reference_chosen, chosen_len, length_normalize, "chosen")
    rejected = _log_ratio(policy_rejected, reference_rejected, rejected_len, length_normalize, "rejected")
    return bradley_terry(beta * chosen, beta * rejected, reduction=reduction)


def bradley_terry(reward_chosen: Tensor, reward_rejected: Tensor, *,
                  reduction: PairReduction = "mean") -> tuple[Tensor, Metrics]:
    """Bradley–Terry (1952) negative log-likelihood of the preference y_w ≻ y_l: −log σ(r_w − r_l).

    The loss of a reward model on preference pairs (Ouyang et al. 2022, Eq. 1; Stiennon et al. 2020),
    and of DPO with r = β·log π/π_ref. Equal rewards give log 2.

    Args:
        reward_chosen, reward_rejected: (B,) scalar rewards r(x, y_w), r(x, y_l).
        reduction: "mean" over the pairs, or "sum" (loss and metrics alike).
    Returns:
        (loss, metrics), metrics of the rewards as given.
    """
    chosen, rejected = _float(reward_chosen), _float(reward_rejected)
    loss = _reduce(-F.logsigmoid(chosen - rejected), reduction)
    return loss, _metrics(chosen, rejected, reduction)


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
    reduction: PairReduction = "mean",
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
        reduction=reduction,
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
    reduction: PairReduction = "mean",
) -> tuple[Tensor, Metrics]:
    """IPO (Azar et al. 2024): (h − 1/(2β))², h as in ``dpo``/``dpkd`` (reference = teacher for KD).

    Args and returns as ``dpo``; rewards are β·log-ratio.
    """
    chosen = _log_ratio(policy_chosen, reference_chosen, chosen_len, length_normalize, "chosen")
    rejected = _log_ratio(policy_rejected, reference_rejected, rejected_len, length_normalize, "rejected")
    loss = _reduce((chosen - rejected - 1.0 / (2.0 * beta)) ** 2, reduction)
    return loss, _metrics(beta * chosen, beta * rejected, reduction)


def cpo(
    policy_chosen: Tensor, policy_rejected: Tensor, *, beta: float = 0.1, reduction: PairReduction = "mean"
) -> tuple[Tensor, Metrics]:
    """CPO (Xu et al. 2024): −log σ(β·(log p_θ(y_w) − log p_θ(y_l))) − log p_θ(y_w); no reference term.

    Args:
        policy_chosen, policy_rejected: (B,) log p_θ(y_w|x), log p_θ(y_l|x) (sums over tokens).
        beta: β.
        reduction: "mean" over the pairs, or "sum".
    Returns:
        (loss, metrics); rewards are β·log p_θ(y).
    """
    chosen, rejected = _float(policy_chosen), _float(policy_rejected)
    loss = _reduce(-F.logsigmoid(beta * (chosen - rejected)) - chosen, reduction)
    return loss, _metrics(beta * chosen, beta * rejected, reduction)


def simpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    *,
    reduction: PairReduction = "mean",
) -> tuple[Tensor, Metrics]:
    """SimPO (Meng et al. 2024): −log σ(β/|y_w|·log p_θ(y_w) − β/|y_l|·log p_θ(y_l) − γ); no reference.

    Args:
        policy_chosen, policy_rejected: (B,) log p_θ(y_w|x), log p_θ(y_l|x) (sums over tokens).
        chosen_len, rejected_len: (B,) |y_w|, |y_l| (token counts, clamped at 1).
        beta: β; gamma: γ, the target reward margin.
        reduction: "mean" over the pairs, or "sum".
    Returns:
        (loss, metrics); rewards are β/|y|·log p_θ(y) (the margin excludes γ).
    """
    chosen = beta * _float(policy_chosen) / chosen_len.to(compute_dtype(policy_chosen.dtype)).clamp(min=1)
    rejected = beta * _float(policy_rejected) / rejected_len.to(compute_dtype(policy_rejected.dtype)).clamp(min=1)
    loss = _reduce(-F.logsigmoid(chosen - rejected - gamma), reduction)
    return loss, _metrics(chosen, rejected, reduction)


# --- listwise: a ranking of K responses ------------------------------------------------------------


def plackett_luce(scores: Tensor, mask: Tensor | None = None, *, reduction: PairReduction = "mean") -> Tensor:
    """Plackett–Luce negative log-likelihood of each row's ranking, best first (Plackett 1975; Luce 1959).

        −log P(y¹ ≻ y² ≻ … ≻ yᴷ) = −Σ_{k=1}^{K−1} [ s_k − log Σ_{i=k}^{K} exp(s_i) ]

    With K = 2 this is Bradley–Terry, −log σ(s_1 − s_2). Equal scores give log K!.

    Args:
        scores: (B, K) the score of each row's responses in rank order (column 0 the best).
        mask: (B, K) bool, the responses each row has: a prefix of its columns (rows may rank fewer than
            K; a row with one response contributes 0). None: all.
        reduction: "mean" over the rows, or "sum".
    Returns:
        The loss (float32 at least).
    """
    s = _float(scores)
    if mask is None:
        mask = torch.ones_like(s, dtype=torch.bool)
    if mask.shape != s.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of the scores' shape {tuple(s.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask must mark a prefix of each row's ranked responses (no gap before a kept one)")
    # A finite fill, not −inf: a column with no response left would make logsumexp's backward 0·inf.
    filled = torch.where(mask, s, torch.finfo(s.dtype).min / 4)
    tail = torch.logcumsumexp(filled.flip(-1), dim=-1).flip(-1)  # (B, K): log Σ_{i ≥ k} exp(s_i)
    counted = mask.clone()
    counted[:, :-1] &= mask[:, 1:]  # the last ranked response's term is log 1
    counted[:, -1] = False
    return _reduce(torch.where(counted, tail - s, 0.0).sum(-1), reduction)


def pro(
    policy: Tensor,
    lengths: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 1.0,
    length_normalize: bool = True,
    reduction: PairReduction = "mean",
) -> tuple[Tensor, Metrics]:
    """PRO (Song et al. 2023, "Preference Ranking Optimization for Human Alignment", Eq. 6): Plackett–Luce
    over the policy's own scores of K responses ranked by a teacher or judge, best first.

        s_k = β · log p_θ(y^k|x) / |y^k|          (without ``length_normalize``: β · log p_θ(y^k|x))
        L   = −Σ_{k<K} log [ exp(s_k) / Σ_{i ≥ k} exp(s_i) ]

    No reference model; the paper adds SFT on y¹ (a method's ``lm_weight``·CE on the best response). Its
    reward-model-dependent temperatures are not applied (every T = 1/β). With K = 2 and ``length_normalize``
    this is SimPO with γ = 0.

    Args:
        policy: (B, K) log p_θ(y^k|x) (sums over tokens), column 0 the best.
        lengths: (B, K) token counts |y^k| (clamped at 1).
        mask: (B, K) bool, the responses each row ranks (a prefix); None: all.
        beta: β, the scale of the scores.
        length_normalize: divide each log-prob by its length (the paper's score).
        reduction: "mean" over the rows, or "sum" (loss and metrics alike).
    Returns:
        (loss, metrics): the metrics of the scores of the best (chosen) and the worst ranked (rejected) response.
    """
    logp = _float(policy)
    if length_normalize:
        logp = logp / lengths.to(logp.dtype).clamp(min=1)
    scores = beta * logp
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    loss = plackett_luce(scores, mask, reduction=reduction)
    last = (mask.sum(-1) - 1).clamp(min=0)  # (B,)
    return loss, _metrics(scores[:, 0], scores.gather(-1, last[:, None]).squeeze(-1), reduction)


LISTWISE_FORMS = {"pro": pro}
"""Listwise preference forms by name: each takes (B, K) log-prob sums of ranked responses, their lengths and mask."""


# --- the forms behind one signature ---------------------------------------------------------------


class PreferenceForm(Protocol):
    """One preference form: ``(loss, metrics)`` from per-sequence log-prob sums (B,) of chosen and rejected.

    Every entry of ``PREFERENCE_FORMS`` takes all of these arguments and uses those its form needs:
    the reference log-probs only for the forms in ``NEEDS_REFERENCE`` (others ignore them, so
    ``None`` is fine), ``length_normalize`` only where the form makes it optional (dpkd, dpo, ipo;
    simpo always divides by |y|, cpo never does), ``gamma`` only in simpo. ``chosen_len`` and
    ``rejected_len`` are (B,) token counts.
    """

    def __call__(
        self,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        reference_chosen: Tensor | None,
        reference_rejected: Tensor | None,
        *,
        chosen_len: Tensor,
        rejected_len: Tensor,
        beta: float,
        gamma: float = 0.5,
        length_normalize: bool = False,
        reduction: PairReduction = "mean",
    ) -> tuple[Tensor, Metrics]: ...


def _reference(form: str, reference: Tensor | None, which: str) -> Tensor:
    if reference is None:
        raise ValueError(f"preference form {form!r} needs the reference model's log-probs of {which}; got None")
    return reference


def _with_reference(form: str, fn) -> PreferenceForm:
    def loss(
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        reference_chosen: Tensor | None,
        reference_rejected: Tensor | None,
        *,
        chosen_len: Tensor,
        rejected_len: Tensor,
        beta: float,
        gamma: float = 0.5,
        length_normalize: bool = False,
        reduction: PairReduction = "mean",
    ) -> tuple[Tensor, Metrics]:
        return fn(
            policy_chosen,
            policy_rejected,
            _reference(form, reference_chosen, "y_w"),
            _reference(form, reference_rejected, "y_l"),
            beta=beta,
            chosen_len=chosen_len,
            rejected_len=rejected_len,
            length_normalize=length_normalize,
            reduction=reduction,
        )

    loss.__name__ = loss.__qualname__ = f"{form}_form"
    loss.__doc__ = f"``{form}`` behind the :class:`PreferenceForm` signature (gamma unused)."
    return loss


def _cpo_form(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor | None,
    reference_rejected: Tensor | None,
    *,
    chosen_len: Tensor,
    rejected_len: Tensor,
    beta: float,
    gamma: float = 0.5,
    length_normalize: bool = False,
    reduction: PairReduction = "mean",
) -> tuple[Tensor, Metrics]:
    """``cpo`` behind the :class:`PreferenceForm` signature (no reference, lengths, length_normalize or gamma)."""
    return cpo(policy_chosen, policy_rejected, beta=beta, reduction=reduction)


def _simpo_form(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor | None,
    reference_rejected: Tensor | None,
    *,
    chosen_len: Tensor,
    rejected_len: Tensor,
    beta: float,
    gamma: float = 0.5,
    length_normalize: bool = False,
    reduction: PairReduction = "mean",
) -> tuple[Tensor, Metrics]:
    """``simpo`` behind the :class:`PreferenceForm` signature (no reference; always length-normalised)."""
    return simpo(policy_chosen, policy_rejected, chosen_len, rejected_len, beta=beta, gamma=gamma, reduction=reduction)


PREFERENCE_FORMS: dict[str, PreferenceForm] = {
    "dpkd": _with_reference("dpkd", dpkd),
    "dpo": _with_reference("dpo", dpo),
    "ipo": _with_reference("ipo", ipo),
    "cpo": _cpo_form,
    "simpo": _simpo_form,
}
"""Preference forms by name (DPKD paper §4.4), each a :class:`PreferenceForm`."""

NEEDS_REFERENCE: frozenset[str] = frozenset({"dpkd", "dpo", "ipo"})
"""The forms whose loss takes the reference model's log-probs (dpkd: the teacher; dpo: the frozen initial
student; ipo: the teacher); cpo and simpo need none."""
