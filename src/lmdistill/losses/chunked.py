"""Fused "lm_head + divergence" computed in chunks of positions, for large vocabularies.

The dense path materialises the student's (B, T, V) logits, their float32 log-softmax and the
autograd buffers of the divergence: several (B, T, V) float32 tensors at once. Here the logits
of ``chunk_size`` positions at a time are computed from the last hidden states, reduced to one
value per position and dropped, so no (B, T, V) student tensor ever exists. Two ways to get the
gradients, both equal to the dense path's:

- ``recompute=True``: forward keeps only the inputs and the (N,) values; backward recomputes
  each chunk's logits and backpropagates through the chunk (4 head matmuls in all).
- ``recompute=False`` (default for a scalar result): each chunk's gradient w.r.t. hidden, W and
  b is computed in the same pass as its value, during forward, and kept until backward, which
  only scales it by the incoming scalar gradient (3 head matmuls, like the dense path; the
  kept gradients are (B, T, H) + (V, H) + (V,), the size of the inputs, not of the logits).
  A per-token result (``reduction="none"``) always recomputes, since its incoming gradient is
  not a single scalar.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Reduction, Teacher, TopK, compute_dtype, log_distributions, masked_reduce, resolve_reduction
from .divergences import Kernel, get_kernel

CHUNK_ELEMENTS = 1 << 21
"""Default chunk size in logits elements: 8 MiB in float32."""
MIN_CHUNK_POSITIONS = 64
"""Default lower bound on positions per chunk (each chunk adds once into the (V, H) weight gradient)."""


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


def _teacher_chunk(logits: Tensor | None, ids: Tensor | None, logprobs: Tensor | None, where: slice | Tensor) -> Teacher:
    if logits is not None:
        return _take(logits, where)  # type: ignore[return-value]
    return TopK(_take(ids, where), _take(logprobs, where))  # type: ignore[arg-type]


class _Inputs(NamedTuple):
    hidden: Tensor  # (M, H), all flat positions
    weight: Tensor  # (V, H)
    bias: Tensor | None  # (V,)
    teacher_logits: Tensor | None  # (M, V)
    teacher_ids: Tensor | None  # (M, k)
    teacher_logprobs: Tensor | None  # (M, k)


class _Spec(NamedTuple):
    chunks: list[_Chunk]
    kernel: Kernel
    params: dict[str, float]
    temperature: float


def _values_dtype(x: _Inputs) -> torch.dtype:
    teacher = x.teacher_logits if x.teacher_logits is not None else x.teacher_logprobs
    return compute_dtype(x.hidden.dtype, x.weight.dtype, teacher.dtype)  # type: ignore[union-attr]


def _chunk_values(x: _Inputs, spec: _Spec, where: slice | Tensor) -> Tensor:
    """(C,) divergence values of one chunk, no graph."""
    logits = F.linear(_take(x.hidden, where), x.weight, x.bias)  # (C, V), in the head's dtype
    teacher = _teacher_chunk(x.teacher_logits, x.teacher_ids, x.teacher_logprobs, where)
    return spec.kernel(*log_distributions(logits, teacher, temperature=spec.temperature), **spec.params)


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

    def add_chunk(self, x: _Inputs, spec: _Spec, where: slice | Tensor, grad_values: Tensor) -> Tensor:
        """Recompute the chunk's logits with a graph, backpropagate ``grad_values`` (C,) to them and on
        into the buffers; return the chunk's (C,) values."""
        h = _take(x.hidden, where)  # (C, H)
        with torch.no_grad():
            logits = F.linear(h, x.weight, x.bias)  # (C, V)
        logits.requires_grad_()
        teacher = _teacher_chunk(x.teacher_logits, x.teacher_ids, x.teacher_logprobs, where)
        with torch.enable_grad():
            values = spec.kernel(*log_distributions(logits, teacher, temperature=spec.temperature), **spec.params)
            (grad_logits,) = torch.autograd.grad(values, logits, grad_values)  # (C, V)
        del logits, teacher
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
        return values.detach()

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
    """values (N,) = kernel(log_softmax(hidden[rows] @ W.T + b), teacher[rows]); backward recomputes
    each chunk's logits. Keeps only the inputs between forward and backward."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, *inputs: Tensor | None) -> Tensor:  # type: ignore[override]
        x = _Inputs(*inputs)
        n = spec.chunks[-1][1] if spec.chunks else 0
        values = x.hidden.new_empty(n, dtype=_values_dtype(x))
        for a, b, where in spec.chunks:
            values[a:b] = _chunk_values(x, spec, where)
        ctx.save_for_backward(*x)
        ctx.spec = spec
        return values

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x = _Inputs(*ctx.saved_tensors)
        grads = _Grads(x, ctx.needs_input_grad[1:4])
        for a, b, where in ctx.spec.chunks:
            grads.add_chunk(x, ctx.spec, where, grad_values[a:b])
        return (None, *grads.result(), None, None, None)


class _ChunkedSumFused(torch.autograd.Function):
    """Σ_rows kernel(...) as a scalar; each chunk's gradients are computed in the same pass as its
    value (one matmul and one divergence pass fewer than recomputing), and backward scales them
    by the incoming scalar gradient. Keeps the (M, H), (V, H), (V,) gradients between the two."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, want_grad: bool, *inputs: Tensor | None) -> Tensor:  # type: ignore[override]
        x = _Inputs(*inputs)
        need = tuple(
            want_grad and t is not None and t.requires_grad for t in (x.hidden, x.weight, x.bias)
        )
        total = x.hidden.new_zeros((), dtype=_values_dtype(x))
        if not any(need):
            for _, _, where in spec.chunks:
                total += _chunk_values(x, spec, where).sum()
            ctx.grads = None
            return total
        grads = _Grads(x, need)  # type: ignore[arg-type]
        for a, b, where in spec.chunks:
            ones = total.new_ones(b - a)
            total += grads.add_chunk(x, spec, where, ones).sum()
        ctx.grads = grads  # the gradients only: the inputs (the teacher logits) may be freed now
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            return (None,) * 8
        grads = ctx.grads.result(grad_total)
        return (None, None, *grads, None, None, None)


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
    dense path. Not twice differentiable.

    Args:
        hidden: (B, T, H) the student's last hidden states (after the final norm).
        lm_head_weight: (V, H) the output head; lm_head_bias: (V,) or None.
        teacher: (B, T, V) teacher logits or ``TopK`` (B, T, k). The teacher receives no
            gradient (it is frozen): its gradient is returned as None whatever its requires_grad.
        mask: (B, T) bool, True on the positions that count.
        name: a key of ``LOSSES`` ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl").
        chunk_size: positions per chunk; default ``default_chunk_size(V)`` = max(64, 2**21 // V).
            Peak extra memory grows with chunk_size·V; below a few dozen positions the repeated
            accumulation into the (V, H) weight gradient starts to cost time.
        temperature, per_token, reduction: as for the dense divergences.
        recompute: for a scalar result, recompute each chunk's logits in backward (least memory
            between forward and backward) instead of computing the gradients during forward
            (one head matmul and one divergence pass fewer). Ignored for per-token results,
            which always recompute. Under ``torch.no_grad()`` neither computes gradients.
        **params: the divergence's parameters (beta for jsd, alpha for skl/srkl, mu for akl).

    Returns:
        A scalar (mean or sum over unmasked positions; mean 0 when there are none), or (B, T)
        with per_token=True / reduction="none".
    """
    reduction = resolve_reduction(per_token, reduction)
    kernel = get_kernel(name)
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
    if isinstance(teacher, TopK):
        if teacher.sampled:
            raise ValueError("the chunked path does not use a TopK's tail samples; call the dense divergence "
                             "(lmdistill.losses.fkl) for a teacher with tail samples")
        if teacher.ids.shape[:-1] != mask.shape or teacher.logprobs.shape != teacher.ids.shape:
            raise ValueError(f"TopK ids/logprobs must be mask {tuple(mask.shape)} + (k,)")
        k = teacher.ids.shape[-1]
        teacher_args = (None, teacher.ids.reshape(-1, k), teacher.logprobs.detach().reshape(-1, k))
    else:
        if teacher.shape != (*mask.shape, vocab):
            raise ValueError(f"teacher logits {tuple(teacher.shape)} must be {(*mask.shape, vocab)}")
        teacher_args = (teacher.detach().reshape(-1, vocab), None, None)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher, TopK) and temperature != 1.0:
        raise ValueError("a TopK teacher needs temperature=1.0 (see lmdistill.losses.log_distributions)")

    flat_mask = mask.reshape(-1)
    rows = flat_mask.nonzero().squeeze(1)  # (N,)
    spec = _Spec(_plan_chunks(rows, chunk_size), kernel, params, temperature)
    inputs = (hidden.reshape(-1, width), lm_head_weight, lm_head_bias, *teacher_args)
    if reduction == "none" or recompute:
        values = _ChunkedValues.apply(spec, *inputs)  # (N,)
        per_position = values.new_zeros(flat_mask.shape).index_put((rows,), values).view(mask.shape)
        return masked_reduce(per_position, mask, reduction)
    total = _ChunkedSumFused.apply(spec, torch.is_grad_enabled(), *inputs)  # sum over the N positions
    return total if reduction == "sum" else total / max(rows.numel(), 1)
