"""Fused "lm_head + divergence (+ cross-entropy)" computed in chunks of positions, for large vocabularies.

The dense path materialises the student's (B, T, V) logits, their float32 log-softmax and the
autograd buffers of the divergence: several (B, T, V) float32 tensors at once. Here the logits
of ``chunk_size`` positions at a time are computed from the last hidden states, reduced to one
value per position and dropped, so no (B, T, V) student tensor ever exists. The data
cross-entropy (−log s(target) per position, at temperature 1) can come from the same chunk's
logits: one head projection per chunk serves both terms. Two ways to get the gradients, both
equal to the dense path's:

- ``recompute=True``: forward keeps only the inputs and the (N,) values; backward recomputes
  each chunk's logits and backpropagates through the chunk (4 head matmuls in all), for any
  upstream gradients of the two terms.
- ``recompute=False`` (default for a scalar result): each chunk's gradient w.r.t. hidden, W and
  b is computed in the same pass as its value, during forward, and kept until backward, which
  only scales it by the incoming scalar gradient (3 head matmuls, like the dense path; the
  kept gradients are (B, T, H) + (V, H) + (V,), the size of the inputs, not of the logits).
  With the cross-entropy, what is kept is the gradient of (1 − w)·divergence + w·CE for the
  ``ce_weight`` w given at forward, so the two upstream gradients must be in that ratio (as the
  training loop's weight · term / units makes them); any other ratio is refused in backward.
  A per-token result (``reduction="none"``) always recomputes, since its incoming gradient is
  not a single scalar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Reduction, Teacher, TopK, compute_dtype, log_distributions, masked_reduce, resolve_reduction
from .divergences import _fkl_sampled_tail, get_kernel

CHUNK_ELEMENTS = 1 << 21
"""Default chunk size in logits elements: 8 MiB in float32."""
MIN_CHUNK_POSITIONS = 64
"""Default lower bound on positions per chunk (each chunk adds once into the (V, H) weight gradient)."""
RATIO_RTOL = 1e-4
"""Relative tolerance on the ratio of the two upstream gradients of the fused path (rounding of weight / units)."""


def default_chunk_size(vocab: int) -> int:
    """Positions per chunk: ``max(64, 2**21 // V)``, e.g. 64 for V ≥ 32768, 256 for V = 8192.

    Small chunks keep the temporaries small (and, on CPU, below the allocator's mmap threshold,
    so they are reused instead of page-faulted in again); at least 64 positions keep the
    per-chunk read-modify-write of the (V, H) weight gradient cheap next to the chunk's matmuls.
    """
    return max(MIN_CHUNK_POSITIONS, CHUNK_ELEMENTS // vocab)


# One chunk is either a contiguous run of flat positions (a slice, no copy) or an index tensor.
_Chunk = tuple[int, int, "slice | Tensor"]


def _plan_chunks(rows: Tensor, chunk_size: int) -> list[_Chunk]:
    """Split the (N,) sorted flat positions into chunks of at most ``chunk_size``: (a, b, where)."""
    rows_cpu = rows.cpu()
    chunks: list[_Chunk] = []
    for a in range(0, rows.numel(), chunk_size):
        b = min(a + chunk_size, rows.numel())
        first, last = int(rows_cpu[a]), int(rows_cpu[b - 1])
        where: slice | Tensor = slice(first, last + 1) if last - first == b - a - 1 else rows[a:b]
        chunks.append((a, b, where))
    return chunks


def _take(x: Tensor | None, where: slice | Tensor) -> Tensor | None:
    if x is None:
        return None
    return x[where] if isinstance(where, slice) else x.index_select(0, where)


class _Inputs(NamedTuple):
    hidden: Tensor  # (M, H), all flat positions
    weight: Tensor  # (V, H)
    bias: Tensor | None  # (V,)
    teacher_logits: Tensor | None  # (M, V)
    teacher_ids: Tensor | None  # (M, k)
    teacher_logprobs: Tensor | None  # (M, k)
    tail_ids: Tensor | None  # (M, n), only for fkl from a TopK with tail samples
    tail_plogp: Tensor | None  # (M,)
    targets: Tensor | None  # (M,) the token each position predicts, only with the cross-entropy


_NO_GRADS = (None,) * (len(_Inputs._fields) - 3)  # for the inputs after hidden, weight, bias


def _teacher_chunk(x: _Inputs, where: slice | Tensor) -> Teacher:
    if x.teacher_logits is not None:
        return _take(x.teacher_logits, where)  # type: ignore[return-value]
    top = TopK(_take(x.teacher_ids, where), _take(x.teacher_logprobs, where))  # type: ignore[arg-type]
    if x.tail_ids is None:
        return top
    return top._replace(tail_ids=_take(x.tail_ids, where), tail_plogp=_take(x.tail_plogp, where))


class _Spec(NamedTuple):
    chunks: list[_Chunk]
    divergence: Callable[[Tensor, Teacher], Tensor]  # (C, V) student logits, the chunk's teacher -> (C,)
    dtype: torch.dtype  # of the values (float32 at least)
    ce_weight: float  # w: the fused path keeps the gradient of (1 − w)·divergence + w·CE


def _chunk_terms(x: _Inputs, spec: _Spec, where: slice | Tensor, logits: Tensor) -> tuple[Tensor, Tensor | None]:
    """The chunk's (C,) divergence values and (C,) cross-entropies (None without targets) from its (C, V) logits."""
    div = spec.divergence(logits, _teacher_chunk(x, where))
    if x.targets is None:
        return div, None
    z = logits.to(spec.dtype)  # temperature 1: the data's likelihood
    ce = torch.logsumexp(z, dim=-1) - z.gather(-1, _take(x.targets, where)[:, None]).squeeze(-1)  # type: ignore[index]
    return div, ce


def _chunk_values(x: _Inputs, spec: _Spec, where: slice | Tensor) -> tuple[Tensor, Tensor | None]:
    """The chunk's values as ``_chunk_terms``, no graph."""
    return _chunk_terms(x, spec, where, F.linear(_take(x.hidden, where), x.weight, x.bias))  # (C, V) in the head's dtype


class _Grads:
    """Gradient buffers for hidden (M, H), weight (V, H), bias (V,), filled chunk by chunk."""

    def __init__(self, x: _Inputs, need: tuple[bool, bool, bool]) -> None:
        # Weight and bias gradients accumulate over chunks in float32 at least, cast once at the end.
        self.acc_dtype = compute_dtype(x.weight.dtype)
        self.dtypes = (x.hidden.dtype, x.weight.dtype, x.bias.dtype if x.bias is not None else None)
        dev = x.weight.device
        self.hidden = torch.zeros_like(x.hidden) if need[0] else None
        self.weight = torch.zeros(x.weight.shape, dtype=self.acc_dtype, device=dev) if need[1] else None
        self.bias = torch.zeros(x.weight.shape[0], dtype=self.acc_dtype, device=dev) if need[2] else None

    def add_chunk(self, x: _Inputs, spec: _Spec, where: slice | Tensor, grad_div: Tensor,
                  grad_ce: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Recompute the chunk's logits with a graph, backpropagate ``grad_div`` (C,) and ``grad_ce`` (C,)
        (ignored without targets) to them and on into the buffers; return the chunk's (C,) values."""
        h = _take(x.hidden, where)  # (C, H)
        with torch.no_grad():
            logits = F.linear(h, x.weight, x.bias)  # (C, V)
        logits.requires_grad_()
        with torch.enable_grad():
            div, ce = _chunk_terms(x, spec, where, logits)
            outputs, grads = [div], [grad_div]
            if ce is not None:  # the CE's part of grad_logits is softmax − onehot(target), times grad_ce
                outputs.append(ce)
                grads.append(grad_ce)  # type: ignore[arg-type]
            (grad_logits,) = torch.autograd.grad(outputs, logits, grads)  # (C, V)
        del logits
        if self.hidden is not None:
            grad_h = grad_logits @ x.weight  # (C, H)
            if isinstance(where, slice):
                self.hidden[where] = grad_h
            else:
                self.hidden.index_copy_(0, where, grad_h)
        if self.weight is not None:
            self.weight.addmm_(grad_logits.t().to(self.acc_dtype), h.to(self.acc_dtype))
        if self.bias is not None:
            self.bias += grad_logits.sum(0, dtype=self.acc_dtype)
        return div.detach(), None if ce is None else ce.detach()

    def result(self, scale: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The three gradients (None where not needed), times ``scale``, in their inputs' dtypes."""
        out = []
        for grad, dtype in zip((self.hidden, self.weight, self.bias), self.dtypes):
            if grad is not None:
                if scale is not None:
                    grad = grad * scale.to(grad.dtype)
                grad = grad.to(dtype)
            out.append(grad)
        return out[0], out[1], out[2]


class _ChunkedValues(torch.autograd.Function):
    """(divergence (N,), CE (N,)) with divergence = kernel(log_softmax(hidden[rows] @ W.T + b), teacher[rows])
    and CE = −log_softmax(...)[targets[rows]] (an empty, non-differentiable (0,) without targets);
    backward recomputes each chunk's logits. Keeps only the inputs between forward and backward."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, *inputs: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x = _Inputs(*inputs)
        n = spec.chunks[-1][1] if spec.chunks else 0
        div = x.hidden.new_empty(n, dtype=spec.dtype)
        ce = x.hidden.new_empty(n if x.targets is not None else 0, dtype=spec.dtype)
        for a, b, where in spec.chunks:
            div_chunk, ce_chunk = _chunk_values(x, spec, where)
            div[a:b] = div_chunk
            if ce_chunk is not None:
                ce[a:b] = ce_chunk
        if x.targets is None:
            ctx.mark_non_differentiable(ce)
        ctx.save_for_backward(*x)
        ctx.spec = spec
        return div, ce

    @staticmethod
    def backward(ctx: Any, grad_div: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x = _Inputs(*ctx.saved_tensors)
        grads = _Grads(x, ctx.needs_input_grad[1:4])
        for a, b, where in ctx.spec.chunks:
            grads.add_chunk(x, ctx.spec, where, grad_div[a:b], grad_ce[a:b] if x.targets is not None else None)
        return (None, *grads.result(), *_NO_GRADS)


def _common_scale(grad_div: Tensor, grad_ce: Tensor, ce_weight: float) -> Tensor:
    """The s with (grad_div, grad_ce) = s·(1 − w, w); an error if the two are not in that ratio."""
    w_div, w_ce = 1.0 - ce_weight, ce_weight
    lhs, rhs = grad_div * w_ce, grad_ce * w_div
    finite = bool(torch.isfinite(lhs) & torch.isfinite(rhs))  # a non-finite gradient goes on as it is
    if finite and bool((lhs - rhs).abs() > RATIO_RTOL * torch.maximum(lhs.abs(), rhs.abs())):
        raise RuntimeError(
            f"the fused chunked divergence + CE kept the gradient of {w_div:g}·divergence + {w_ce:g}·CE "
            f"(ce_weight={ce_weight:g}), but backward got gradients {float(grad_div):.6g} and {float(grad_ce):.6g} "
            "for the two terms, not in that ratio: pass the ce_weight you combine them with, or recompute=True"
        )
    return grad_div / w_div if w_div >= w_ce else grad_ce / w_ce


class _ChunkedSumFused(torch.autograd.Function):
    """(Σ_rows divergence, Σ_rows CE) as two scalars (the CE sum a non-differentiable 0 without targets);
    each chunk's gradients (of (1 − w)·divergence + w·CE) are computed in the same pass as its values
    (one matmul and one divergence pass fewer than recomputing), and backward scales them by the
    incoming scalar gradient. Keeps the (M, H), (V, H), (V,) gradients between the two."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, spec: _Spec, want_grad: bool, *inputs: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        x = _Inputs(*inputs)
        need = tuple(
            want_grad and t is not None and t.requires_grad for t in (x.hidden, x.weight, x.bias)
        )
        div_total = x.hidden.new_zeros((), dtype=spec.dtype)
        ce_total = torch.zeros_like(div_total)
        ctx.has_ce, ctx.ce_weight, ctx.grads = x.targets is not None, spec.ce_weight, None
        if not ctx.has_ce:
            ctx.mark_non_differentiable(ce_total)
        grads = _Grads(x, need) if any(need) else None  # type: ignore[arg-type]
        for a, b, where in spec.chunks:
            if grads is None:
                div, ce = _chunk_values(x, spec, where)
            else:
                ones = div_total.new_ones(b - a)
                div, ce = grads.add_chunk(x, spec, where, ones * (1.0 - spec.ce_weight), ones * spec.ce_weight)
            div_total += div.sum()
            if ce is not None:
                ce_total += ce.sum()
        ctx.grads = grads  # the gradients only: the inputs (the teacher logits) may be freed now
        return div_total, ce_total

    @staticmethod
    def backward(ctx: Any, grad_div: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            return (None, None, None, None, None, *_NO_GRADS)
        scale = _common_scale(grad_div, grad_ce, ctx.ce_weight) if ctx.has_ce else grad_div
        return (None, None, *ctx.grads.result(scale), *_NO_GRADS)


def _divergence_values(name: str, temperature: float, params: dict[str, float],
                       sampled_tail: bool) -> Callable[[Tensor, Teacher], Tensor]:
    """(C, V) student logits, a chunk's teacher -> (C,) divergence values, as the dense ``LOSSES[name]`` computes them."""
    if sampled_tail:  # the dense fkl's unbiased estimate from a TopK's tail samples
        return _fkl_sampled_tail
    kernel = get_kernel(name)

    def values(logits: Tensor, teacher: Teacher) -> Tensor:
        return kernel(*log_distributions(logits, teacher, temperature=temperature), **params)

    return values


def _chunked(hidden: Tensor, lm_head_weight: Tensor, lm_head_bias: Tensor | None, teacher: Teacher, mask: Tensor,
             targets: Tensor | None, ce_weight: float, *, name: str, chunk_size: int | None, temperature: float,
             per_token: bool, reduction: Reduction, recompute: bool,
             params: dict[str, float]) -> tuple[Tensor, Tensor | None]:
    """The divergence and (with targets) the CE, reduced; the one implementation of both public functions."""
    reduction = resolve_reduction(per_token, reduction)
    get_kernel(name)  # an unknown name fails here, before any work
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if hidden.shape[:-1] != mask.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be mask {tuple(mask.shape)} + (H,)")
    vocab, width = lm_head_weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match lm_head_weight {tuple(lm_head_weight.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sampled_tail = False
    if isinstance(teacher, TopK):
        if temperature != 1.0:
            raise ValueError("a TopK teacher needs temperature=1.0 (see lmdistill.losses.log_distributions)")
        if teacher.ids.shape[:-1] != mask.shape or teacher.logprobs.shape != teacher.ids.shape:
            raise ValueError(f"TopK ids/logprobs must be mask {tuple(mask.shape)} + (k,)")
        k = teacher.ids.shape[-1]
        tail: tuple[Tensor | None, Tensor | None] = (None, None)
        sampled_tail = teacher.sampled and name == "fkl"  # the other divergences use the tail bucket, as dense
        if sampled_tail:
            tail_ids, tail_plogp = teacher.tail_ids, teacher.tail_plogp  # both set when sampled
            if tail_ids.shape[:-1] != mask.shape or tail_plogp.shape != mask.shape:  # type: ignore[union-attr]
                raise ValueError(f"TopK tail_ids/tail_plogp must be mask {tuple(mask.shape)} + (n,) / mask")
            tail = (tail_ids.reshape(-1, tail_ids.shape[-1]), tail_plogp.detach().reshape(-1))  # type: ignore[union-attr]
        teacher_args = (None, teacher.ids.reshape(-1, k), teacher.logprobs.detach().reshape(-1, k), *tail)
        teacher_dtype = teacher.logprobs.dtype
    else:
        if teacher.shape != (*mask.shape, vocab):
            raise ValueError(f"teacher logits {tuple(teacher.shape)} must be {(*mask.shape, vocab)}")
        teacher_args = (teacher.detach().reshape(-1, vocab), None, None, None, None)
        teacher_dtype = teacher.dtype
    flat_targets = None
    if targets is not None:
        if targets.shape != mask.shape or targets.dtype != torch.long:
            raise ValueError(f"targets must be int64 of mask's shape {tuple(mask.shape)}, got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
        counted = targets[mask]
        if counted.numel() and not bool((counted.min() >= 0) & (counted.max() < vocab)):
            raise ValueError(f"targets at the masked positions must be token ids in [0, {vocab})")
        flat_targets = targets.reshape(-1)

    flat_mask = mask.reshape(-1)
    rows = flat_mask.nonzero().squeeze(1)  # (N,)
    dtype = compute_dtype(hidden.dtype, lm_head_weight.dtype, teacher_dtype)
    spec = _Spec(_plan_chunks(rows, chunk_size), _divergence_values(name, temperature, params, sampled_tail),
                 dtype, ce_weight)
    inputs = (hidden.reshape(-1, width), lm_head_weight, lm_head_bias, *teacher_args, flat_targets)
    if reduction == "none" or recompute:
        per_row = _ChunkedValues.apply(spec, *inputs)  # (N,) each

        def reduce(values: Tensor) -> Tensor:
            per_position = values.new_zeros(flat_mask.shape).index_put((rows,), values).view(mask.shape)
            return masked_reduce(per_position, mask, reduction)

        return reduce(per_row[0]), None if targets is None else reduce(per_row[1])
    div, ce = _ChunkedSumFused.apply(spec, torch.is_grad_enabled(), *inputs)  # sums over the N positions
    if reduction == "mean":
        div, ce = div / max(rows.numel(), 1), ce / max(rows.numel(), 1)
    return div, None if targets is None else ce


def chunked_divergence(
    hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    teacher: Teacher,
    mask: Tensor,
    *,
    name: str = "fkl",
    chunk_size: int | None = None,
    temperature: float = 1.0,
    per_token: bool = False,
    reduction: Reduction = "mean",
    recompute: bool = False,
    **params: float,
) -> Tensor:
    """Divergence ``name`` between the student's head output and the teacher, chunk by chunk of positions.

    Equal in value and in gradient to the dense path
    ``LOSSES[name](F.linear(hidden, lm_head_weight, lm_head_bias), teacher, mask, ...)``, without
    any (B, T, V) student tensor: only the unmasked positions are computed (padding costs
    nothing), ``chunk_size`` of them at a time. The logits are computed in the dtype of
    ``hidden``/``lm_head_weight`` as the model's head would, then upcast to float32+ like the
    dense path. Not twice differentiable. With the data cross-entropy from the same chunks:
    ``chunked_divergence_and_ce``.

    Args:
        hidden: (B, T, H) the student's last hidden states (after the final norm).
        lm_head_weight: (V, H) the output head; lm_head_bias: (V,) or None.
        teacher: (B, T, V) teacher logits or ``TopK`` (B, T, k), with or without tail samples (used
            by fkl, as the dense fkl uses them). The teacher receives no gradient (it is frozen):
            its gradient is returned as None whatever its requires_grad.
        mask: (B, T) bool, True on the positions that count.
        name: a key of ``LOSSES`` ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl").
        chunk_size: positions per chunk; default ``default_chunk_size(V)`` = max(64, 2**21 // V).
            Peak extra memory grows with chunk_size·V; below a few dozen positions the repeated
            accumulation into the (V, H) weight gradient starts to cost time.
        temperature, per_token, reduction: as for the dense divergences (temperature applies to
            the divergence only).
        recompute: for a scalar result, recompute each chunk's logits in backward (least memory
            between forward and backward) instead of computing the gradients during forward
            (one head matmul and one divergence pass fewer). Ignored for per-token results,
            which always recompute. Under ``torch.no_grad()`` neither computes gradients.
        **params: the divergence's parameters (beta for jsd, alpha for skl/srkl, mu for akl).

    Returns:
        A scalar (mean or sum over unmasked positions; mean 0 when there are none), or (B, T)
        with per_token=True / reduction="none".
    """
    div, _ = _chunked(hidden, lm_head_weight, lm_head_bias, teacher, mask, None, 0.0, name=name,
                      chunk_size=chunk_size, temperature=temperature, per_token=per_token, reduction=reduction,
                      recompute=recompute, params=params)
    return div


def chunked_divergence_and_ce(
    hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    teacher: Teacher,
    mask: Tensor,
    targets: Tensor,
    *,
    ce_weight: float,
    name: str = "fkl",
    chunk_size: int | None = None,
    temperature: float = 1.0,
    per_token: bool = False,
    reduction: Reduction = "mean",
    recompute: bool = False,
    **params: float,
) -> tuple[Tensor, Tensor]:
    """``chunked_divergence`` and the data cross-entropy, both from one head projection per chunk.

    The divergence equals ``chunked_divergence``'s; the CE at each masked position is
    −log softmax(logits)[targets] at temperature 1 (the data's likelihood, whatever ``temperature``),
    equal to ``F.cross_entropy`` on the dense logits of those positions, reduced the same way as
    the divergence. For KD on labels L: ``mask = prediction_mask(L)`` and ``targets[:, t] = L[:, t + 1]``,
    which makes the CE sum ``response_ce_sum``.

    The fused path (``recompute=False``, scalar result) computes the gradient of
    (1 − ce_weight)·divergence + ce_weight·CE during forward, so it needs the upstream gradients of
    the two results in the ratio (1 − ce_weight) : ce_weight (e.g. ``(α·div + (1 − α)·ce) / n`` with
    ce_weight = 1 − α) and raises in backward otherwise; ``recompute=True`` and per-token results
    take any upstream gradients.

    Args: as ``chunked_divergence``, and
        targets: (B, T) int64, the token each position predicts; read only where ``mask`` is True
            (anything, e.g. −100, elsewhere).
        ce_weight: the CE's share w in [0, 1] of the combination whose gradient the fused path keeps.

    Returns:
        (divergence, CE): two scalars (mean or sum over unmasked positions; 0 when there are none),
        or two (B, T) with per_token=True / reduction="none".
    """
    div, ce = _chunked(hidden, lm_head_weight, lm_head_bias, teacher, mask, targets, ce_weight, name=name,
                       chunk_size=chunk_size, temperature=temperature, per_token=per_token, reduction=reduction,
                       recompute=recompute, params=params)
    return div, ce  # type: ignore[return-value]

