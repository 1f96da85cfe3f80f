"""Token-level divergences between the student's and the teacher's next-token distributions.

Each divergence is a *kernel*: a function of two log-distribution tensors (..., K) over the same
support (the vocabulary, or k top ids plus a tail bucket) returning per-position values (...).
The public functions wrap a kernel with the shared plumbing (upcast to float32+, temperature,
top-k support, masking, reduction), so there is one code path for all of them; the chunked path
(``chunked.py``) reuses the same kernels.

Notation (METHODS.md): q = teacher distribution, s = student distribution, per position.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._common import Reduction, Teacher, TopK, log_distributions, masked_reduce, resolve_reduction

Kernel = Callable[..., Tensor]


# --- kernels: (student_logp (..., K), teacher_logp (..., K), **params) -> (...) -------------------


def _kl(logp: Tensor, logr: Tensor) -> Tensor:
    """KL(p‖r) = Σ_K p·(log p − log r) → (...), clamped at 0 (rounding); a term with p = 0 counts 0."""
    p = logp.exp()
    diff = logp - logr
    # 0·log(0/r) = 0 even where log p = −inf or log r = −inf; filling diff (not the product)
    # keeps the backward free of 0·inf as well.
    diff.masked_fill_(p == 0, 0.0)
    return (p * diff).sum(-1).clamp(min=0.0)


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _fkl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    return _kl(teacher_logp, student_logp)


def _rkl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    return _kl(student_logp, teacher_logp)


def _jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    beta = _check_unit("beta", beta)
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    log_m = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


def _skl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1) -> Tensor:
    alpha = _check_unit("alpha", alpha)
    if alpha == 0.0:
        return _kl(teacher_logp, student_logp)
    if alpha == 1.0:
        return _kl(teacher_logp, teacher_logp)
    log_m = torch.logaddexp(teacher_logp + math.log(alpha), student_logp + math.log1p(-alpha))
    return _kl(teacher_logp, log_m)


def _srkl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1) -> Tensor:
    alpha = _check_unit("alpha", alpha)
    if alpha == 0.0:
        return _kl(student_logp, teacher_logp)
    if alpha == 1.0:
        return _kl(student_logp, student_logp)
    log_m = torch.logaddexp(student_logp + math.log(alpha), teacher_logp + math.log1p(-alpha))
    return _kl(student_logp, log_m)


def _tvd(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


@torch.no_grad()
def _akl_weights(student_logp: Tensor, teacher_logp: Tensor, mu: float = 0.5) -> tuple[Tensor, Tensor]:
    mu = _check_unit("mu", mu)
    q, s = teacher_logp.exp(), student_logp.exp()
    q_sorted, order = q.sort(dim=-1, descending=True)
    head = q_sorted.cumsum(-1) <= mu  # cumulative q including the token itself
    head[..., 0] = True  # the top token is always in the head
    gap = (q - s).abs().gather(-1, order)
    g_head = (gap * head).sum(-1)
    g_tail = (gap * ~head).sum(-1)
    g_total = g_head + g_tail
    w_head = torch.where(g_total > 0, g_head / g_total.clamp(min=torch.finfo(g_total.dtype).tiny), 0.5)
    return w_head, 1.0 - w_head


def _akl(student_logp: Tensor, teacher_logp: Tensor, mu: float = 0.5) -> Tensor:
    w_head, w_tail = _akl_weights(student_logp, teacher_logp, mu)
    return w_head * _kl(teacher_logp, student_logp) + w_tail * _kl(student_logp, teacher_logp)


KERNELS: dict[str, Kernel] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "jsd": _jsd,
    "skl": _skl,
    "srkl": _srkl,
    "tvd": _tvd,
    "akl": _akl,
}
"""Name → kernel ``(student_logp (..., K), teacher_logp (..., K), **params) -> (...)``."""


def divergence_from_logprobs(name: str, student_logp: Tensor, teacher_logp: Tensor, **params: float) -> Tensor:
    """The divergence ``name`` per position from two log-distributions (..., K) over one support → (...).

    For callers that already hold normalised log-probs (e.g. the single-step term of MiniLLM).
    No masking, no upcast: pass float32 or float64.
    """
    return get_kernel(name)(student_logp, teacher_logp, **params)


def get_kernel(name: str) -> Kernel:
    """The kernel registered under ``name``; a clear error for an unknown one."""
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; known: {sorted(KERNELS)}") from None


# --- the one wrapper --------------------------------------------------------------------------------


def _token_divergence(
    kernel: Kernel,
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor,
    temperature: float,
    per_token: bool,
    reduction: Reduction,
    **params: float,
) -> Tensor:
    reduction = resolve_reduction(per_token, reduction)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must be student_logits {tuple(student_logits.shape)} without V")
    def compute(s: Tensor, t: Teacher) -> Tensor:
        if kernel is _fkl and isinstance(t, TopK) and t.sampled:
            return _fkl_sampled_tail(s, t)
        return kernel(*log_distributions(s, t, temperature=temperature), **params)

    if bool(mask.all()):
        values = compute(student_logits, teacher)
    else:
        # Only the unmasked positions are computed: padding costs nothing and cannot leak NaN.
        teacher_sel = teacher.select(mask) if isinstance(teacher, TopK) else teacher[mask]
        selected = compute(student_logits[mask], teacher_sel)
        values = selected.new_zeros(mask.shape).index_put((mask,), selected)
    return masked_reduce(values, mask, reduction)


def _fkl_sampled_tail(student_logits: Tensor, teacher: TopK) -> Tensor:
    """KL(q‖s) per position (...) from a top-k teacher with tail samples (``TopK`` docstring).

    Σ_k q·(log q − log s) over the top k, plus the tail term tail_plogp − (tail/n)·Σ_i log s(v_i).
    An unbiased estimate (value and gradient) of the full-vocabulary KL; not clamped at 0, which
    would bias it.
    """
    student_logp, teacher_logp = log_distributions(student_logits, teacher)  # (..., k+1), tail bucket last
    q_head = teacher_logp[..., :-1].exp()
    diff = (teacher_logp[..., :-1] - student_logp[..., :-1]).masked_fill(q_head == 0, 0.0)
    head = (q_head * diff).sum(-1)
    s = student_logits.to(student_logp.dtype)
    tail_s = s.gather(-1, teacher.tail_ids) - torch.logsumexp(s, dim=-1, keepdim=True)  # (..., n)
    tail_q = teacher_logp[..., -1].exp()
    return head + teacher.tail_plogp.to(head.dtype) - tail_q * tail_s.mean(-1)


_DOC_ARGS = """
    Args:
        student_logits: (B, T, V) student logits (any float dtype; computed in float32 at least).
        teacher: (B, T, V) teacher logits, or ``TopK(ids, logprobs)`` with (B, T, k) each; a
            top-k teacher is compared on the k ids plus one tail bucket holding the remaining
            mass of each side (see ``log_distributions``; it requires ``temperature=1``). ``fkl``
            uses a TopK's tail samples when it has them (unbiased; see ``TopK``).
        mask: (B, T) bool, True on the positions that count (response tokens).
        temperature: τ; both models' logits are divided by τ before the softmax.
        per_token: return the (B, T) values (0 at masked positions) instead of the mean.
        reduction: "mean" over unmasked positions (0 when there are none), "sum" over them, or
            "none" (same as ``per_token=True``).
"""


def fkl(
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    per_token: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward KL, KL(q‖s) = Σ_v q·log(q/s): word-level KD (Hinton et al. 2015); mean-seeking.

    It is the KL itself, not the cross-entropy −Σ q·log s (which differs by the teacher's
    entropy), so ``fkl(x, x) == 0``. Equals ``F.kl_div(log s, log q, log_target=True)`` summed over V.
    """
    return _token_divergence(_fkl, student_logits, teacher, mask, temperature, per_token, reduction)


def rkl(
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    per_token: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """Reverse KL, KL(s‖q) = Σ_v s·log(s/q); mode-seeking (MiniLLM, Gu et al. 2024)."""
    return _token_divergence(_rkl, student_logits, teacher, mask, temperature, per_token, reduction)


def jsd(
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    per_token: bool = False,
    reduction: Reduction = "mean",
    beta: float = 0.5,
) -> Tensor:
    """Generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1; TRL's ``generalized_jsd_loss``).

    JSD(β) = β·KL(q‖m) + (1−β)·KL(s‖m), m = β·q + (1−β)·s, with log m = logaddexp(log q + log β,
    log s + log(1−β)) computed in log space. β = 0.5 is the symmetric JSD (≤ log 2).

    Scale jump at the ends: as β → 0, m → s and JSD(β) ≈ β·fkl; as β → 1, JSD(β) ≈ (1−β)·rkl, so
    the loss itself vanishes near the ends. β = 0 and β = 1 are defined (as GKD and TRL do) as
    exactly ``fkl`` and ``rkl``, i.e. 1/β (or 1/(1−β)) times larger than the limit from inside.
    Moving β towards an end therefore also shrinks the loss (and gradient) scale: in a sweep, β
    acts partly as a learning-rate factor; compare β values at matched effective scale.
    """
    return _token_divergence(_jsd, student_logits, teacher, mask, temperature, per_token, reduction, beta=beta)


def skl(
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    per_token: bool = False,
    reduction: Reduction = "mean",
    alpha: float = 0.1,
) -> Tensor:
    """Skew forward KL of DistiLLM (Ko et al. 2024): KL(q ‖ α·q + (1−α)·s). α = 0 is exactly ``fkl``."""
    return _token_divergence(_skl, student_logits, teacher, mask, temperature, per_token, reduction, alpha=alpha)


def srkl(
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    per_token: bool = False,
    reduction: Reduction = "mean",
    alpha: float = 0.1,
) -> Tensor:
    """Skew reverse KL of DistiLLM (Ko et al. 2024): KL(s ‖ α·s + (1−α)·q). α = 0 is exactly ``rkl``."""
    return _token_divergence(_srkl, student_logits, teacher, mask, temperature, per_token, reduction, alpha=alpha)


def tvd(
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    per_token: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """Total variation distance ½·Σ_v |q − s|, in [0, 1]."""
    return _token_divergence(_tvd, student_logits, teacher, mask, temperature, per_token, reduction)


def akl(
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    per_token: bool = False,
    reduction: Reduction = "mean",
    mu: float = 0.5,
) -> Tensor:
    """Adaptive KL (Wu et al. 2024, "Rethinking KL divergence in KD for LLMs"): w_h·fkl + w_t·rkl per position.

    Sort the support by q descending; the head is the tokens whose cumulative q (the token's own
    mass included) is ≤ μ, and the top token is always in it; the tail is the rest.
    g_h = Σ_head |q − s|, g_t = Σ_tail |q − s|, w_h = g_h/(g_h+g_t), w_t = g_t/(g_h+g_t), both
    detached (constants for the gradient); w_h = w_t = ½ when g_h + g_t = 0 (then s = q).
    Tied q values are ordered as ``torch.sort`` leaves them. See ``akl_weights``.
    """
    return _token_divergence(_akl, student_logits, teacher, mask, temperature, per_token, reduction, mu=mu)


for _fn in (fkl, rkl, jsd, skl, srkl, tvd, akl):
    _fn.__doc__ = (_fn.__doc__ or "") + _DOC_ARGS + (
        "\n    Returns:\n        A scalar (float32, or float64 for float64 inputs), or (B, T) with per_token=True.\n"
    )
del _fn


def akl_weights(
    student_logits: Tensor, teacher: Teacher, *, temperature: float = 1.0, mu: float = 0.5
) -> tuple[Tensor, Tensor]:
    """The AKL weights (w_head, w_tail), each (B, T), detached, summing to 1 at every position.

    Same inputs as ``akl`` (no mask: every position is returned).
    """
    return _akl_weights(*log_distributions(student_logits, teacher, temperature=temperature), mu)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "fkl": fkl,
    "rkl": rkl,
    "jsd": jsd,
    "skl": skl,
    "srkl": srkl,
    "tvd": tvd,
    "akl": akl,
}
"""Name → token divergence with the signature ``fn(student_logits, teacher, mask, *, temperature, per_token, reduction, **params)``."""
