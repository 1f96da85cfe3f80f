"""The chunked fused path equals the dense path in value and gradient, with and without the data
cross-entropy, and keeps no (B, T, V) tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmdistill.losses import (
    LOSSES,
    TopK,
    chunked_divergence,
    chunked_divergence_and_ce,
    prediction_mask,
    response_ce_sum,
    sample_tail,
)
from lmdistill.losses.chunked import default_chunk_size

NAMES = sorted(LOSSES)
PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}, "akl": {"mu": 0.4}}


def make(b: int = 2, t: int = 5, h: int = 4, v: int = 7, *, dtype: torch.dtype = torch.float64, seed: int = 0):
    """hidden (B, T, H), head weight (V, H) and bias (V,) requiring grad; teacher logits (B, T, V);
    a mask with padding at the end of row 0 and a prompt at the start of row 1 (N = 7 of 10)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    teacher = torch.randn(b, t, v, generator=g, dtype=dtype) * 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, :1] = False
    return hidden, weight, bias, teacher, mask


def value_and_grads(loss: torch.Tensor, *inputs: torch.Tensor):
    return (loss.detach(), *torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_dense(name, chunk_size, recompute):
    """Value and gradients w.r.t. hidden, weight and bias; chunk sizes that split the 7 unmasked
    positions unevenly (1, 3), exactly (7) and not at all (64)."""
    hidden, weight, bias, teacher, mask = make()
    params = PARAMS.get(name, {})
    dense = value_and_grads(LOSSES[name](F.linear(hidden, weight, bias), teacher, mask, **params), hidden, weight, bias)
    chunked = value_and_grads(
        chunked_divergence(hidden, weight, bias, teacher, mask, name=name, chunk_size=chunk_size, recompute=recompute, **params),
        hidden, weight, bias,
    )  # fmt: skip
    for d, c in zip(dense, chunked):
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)


def topk_teacher(teacher: torch.Tensor, k: int = 3, tail: int = 0) -> TopK:
    """The (B, T, k) top-k of teacher logits (B, T, V), with `tail` systematic tail samples per position (seeded)."""
    b, t, v = teacher.shape
    logp = teacher.log_softmax(-1)
    if not tail:
        top = logp.topk(k, dim=-1)
        return TopK(top.indices, top.values)
    s = sample_tail(logp.reshape(-1, v), k, tail, torch.Generator().manual_seed(1))
    return TopK(s.ids.view(b, t, k), s.logprobs.view(b, t, k).to(teacher.dtype), s.tail_ids.view(b, t, tail),
                s.tail_plogp.view(b, t).to(teacher.dtype))


@pytest.mark.parametrize("tail", [0, 4])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_dense_with_topk_teacher_and_no_bias(name, recompute, tail):
    """A top-3 teacher, with 4 tail samples (which fkl uses, the others ignore, as in the dense path) or none."""
    hidden, weight, _, teacher, mask = make()
    teacher_k = topk_teacher(teacher, tail=tail)
    dense = value_and_grads(LOSSES[name](F.linear(hidden, weight), teacher_k, mask), hidden, weight)
    chunked = value_and_grads(
        chunked_divergence(hidden, weight, None, teacher_k, mask, name=name, chunk_size=3, recompute=recompute), hidden, weight
    )
    for d, c in zip(dense, chunked):
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_reductions_and_temperature(reduction, recompute):
    hidden, weight, bias, teacher, mask = make()
    weights = torch.rand(mask.shape, dtype=torch.float64)  # a non-uniform upstream gradient for "none"

    def scalar(out):
        return (out * weights).sum() if reduction == "none" else out * 1.5

    dense = value_and_grads(
        scalar(LOSSES["jsd"](F.linear(hidden, weight, bias), teacher, mask, reduction=reduction, temperature=2.0)),
        hidden, weight, bias,
    )  # fmt: skip
    chunked = value_and_grads(
        scalar(chunked_divergence(hidden, weight, bias, teacher, mask, name="jsd", chunk_size=2, reduction=reduction,
                                  temperature=2.0, recompute=recompute)),
        hidden, weight, bias,
    )  # fmt: skip
    for d, c in zip(dense, chunked):
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)
    per_token = chunked_divergence(hidden, weight, bias, teacher, mask, per_token=True)
    assert per_token.shape == mask.shape and (per_token[~mask] == 0).all()


@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_gradcheck(recompute):
    hidden, weight, bias, teacher, mask = make(2, 3, 3, 5)
    for name in ("fkl", "jsd"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: chunked_divergence(h, w, b, teacher, mask, name=name, chunk_size=2, recompute=recompute),
            (hidden, weight, bias),
        )


@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_all_masked_gives_zero(recompute):
    hidden, weight, bias, teacher, mask = make()
    none = torch.zeros_like(mask)
    out = chunked_divergence(hidden, weight, bias, teacher, none, recompute=recompute)
    assert out.item() == 0.0
    for grad in torch.autograd.grad(out, (hidden, weight, bias)):
        assert (grad == 0).all()


def test_chunked_ignores_masked_hidden_states():
    hidden, weight, bias, teacher, mask = make()
    out = chunked_divergence(hidden, weight, bias, teacher, mask)
    (grad,) = torch.autograd.grad(out, hidden)
    assert (grad[~mask] == 0).all()
    noisy = hidden.detach().clone()
    noisy[~mask] = float("nan")
    assert chunked_divergence(noisy, weight, bias, teacher, mask).item() == out.item()


def test_chunked_under_no_grad_and_without_grad_inputs():
    hidden, weight, bias, teacher, mask = make()
    expected = LOSSES["fkl"](F.linear(hidden, weight, bias), teacher, mask).detach()
    with torch.no_grad():
        torch.testing.assert_close(chunked_divergence(hidden, weight, bias, teacher, mask), expected)
    out = chunked_divergence(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), teacher, mask)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected)


def test_chunked_bfloat16_matches_dense_bfloat16():
    """bf16 hidden and head: the chunk logits are computed in bf16 like the model's head, then upcast."""
    hidden, weight, _, teacher, mask = make(v=32, h=16, dtype=torch.float32)
    hidden = hidden.detach().bfloat16().requires_grad_()
    weight = weight.detach().bfloat16().requires_grad_()
    dense = value_and_grads(LOSSES["fkl"](F.linear(hidden, weight), teacher.bfloat16(), mask), hidden, weight)
    chunked = value_and_grads(chunked_divergence(hidden, weight, None, teacher.bfloat16(), mask, chunk_size=3), hidden, weight)
    assert chunked[0].dtype == torch.float32 and chunked[1].dtype == chunked[2].dtype == torch.bfloat16
    torch.testing.assert_close(chunked[0], dense[0], rtol=1e-3, atol=1e-3)
    for d, c in zip(dense[1:], chunked[1:]):
        torch.testing.assert_close(c.float(), d.float(), rtol=2e-2, atol=2e-2)


def big_saved_tensors(fn, big: int, teacher: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors of at least `big` elements that autograd keeps between `fn()`'s forward and its
    backward (run here), other than the teacher logits given."""
    saved = []

    def pack(x):
        if x.numel() >= big and x.data_ptr() != teacher.data_ptr():
            saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    out.backward()
    return saved


@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_keeps_no_student_logits(recompute):
    """Between forward and backward, the chunked path keeps no tensor of N·V elements or more (N unmasked positions)
    other than the teacher logits it was given; the dense path keeps several."""
    b, t, h, v = 2, 8, 4, 64
    hidden, weight, bias, teacher, mask = make(b, t, h, v, dtype=torch.float32)
    big = int(mask.sum()) * v  # both paths only compute the unmasked positions
    chunked = lambda: chunked_divergence(hidden, weight, bias, teacher, mask, chunk_size=4, recompute=recompute)  # noqa: E731
    assert big_saved_tensors(chunked, big, teacher) == []
    assert len(big_saved_tensors(lambda: LOSSES["fkl"](F.linear(hidden, weight, bias), teacher, mask), big, teacher)) >= 2


# --------------------------------------------------------------------------- with the data cross-entropy


def make_labeled(b: int = 3, t: int = 6, h: int = 4, v: int = 7, *, seed: int = 0):
    """hidden, weight, bias, teacher as `make`; labels (B, T) with -100 on an uneven prompt and padding per row
    (row 0: prompt 1, padding 2; row 1: prompt 3; row 2: prompt 2, padding 1), the mask of the positions that
    predict a trained label (`prediction_mask`, N = 3 + 2 + 3 = 8 of 18) and their targets labels[:, t + 1]."""
    hidden, weight, bias, teacher, _ = make(b, t, h, v, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, v, (b, t), generator=g)
    for row, (prompt, pad) in enumerate([(1, 2), (3, 0), (2, 1)]):
        labels[row, :prompt] = -100
        labels[row, t - pad:] = -100
    mask = prediction_mask(labels)
    return hidden, weight, bias, teacher, labels, mask, labels.roll(-1, dims=1)


def dense_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """response_ce_sum in the logits' own dtype (response_ce_sum computes in float32, even for float64 logits)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


TEACHERS = ["dense", "dense-tau2", "topk", "topk-tail"]


def teacher_of(kind: str, teacher: torch.Tensor):
    """(teacher, temperature, whether the head has a bias) for one kind of teacher."""
    if kind.startswith("dense"):
        return teacher, (2.0 if kind == "dense-tau2" else 1.0), True
    return topk_teacher(teacher, tail=4 if kind == "topk-tail" else 0), 1.0, False


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("kind", TEACHERS)
@pytest.mark.parametrize("name", NAMES)
def test_chunked_with_ce_equals_dense(name, kind, recompute, reduction):
    """α·D + (1 − α)·CE (α = 0.3) from one head projection per chunk equals the dense
    α·LOSSES[name](logits, teacher) + (1 − α)·CE, in value (each term) and gradient w.r.t. hidden, weight
    (and bias), float64; chunks of 3 split the 8 positions unevenly and across rows. The CE is at
    temperature 1 whatever the divergence's τ, and its sum is response_ce_sum's."""
    alpha = 0.3
    hidden, weight, bias, teacher, labels, mask, targets = make_labeled()
    teacher, tau, with_bias = teacher_of(kind, teacher)
    bias = bias if with_bias else None
    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    params = PARAMS.get(name, {})
    logits = F.linear(hidden, weight, bias)
    d_div = LOSSES[name](logits, teacher, mask, temperature=tau, reduction=reduction, **params)
    d_ce = dense_ce_sum(logits, labels) / (mask.sum() if reduction == "mean" else 1)
    c_div, c_ce = chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, targets, ce_weight=1 - alpha, name=name,
                                            chunk_size=3, temperature=tau, reduction=reduction, recompute=recompute,
                                            **params)
    torch.testing.assert_close(c_div.detach(), d_div.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c_ce.detach(), d_ce.detach(), rtol=1e-10, atol=1e-12)
    if reduction == "sum":
        torch.testing.assert_close(c_ce.detach().float(), response_ce_sum(logits, labels).detach(), rtol=1e-6, atol=0)
    dense = value_and_grads(alpha * d_div + (1 - alpha) * d_ce, *inputs)
    chunked = value_and_grads(alpha * c_div + (1 - alpha) * c_ce, *inputs)
    for d, c in zip(dense, chunked):
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_chunked_with_ce_at_the_ends(alpha):
    """ce_weight 1 (α = 0: the CE alone has a gradient) and 0 (α = 1), fused: the gradient of the weighted sum."""
    hidden, weight, bias, teacher, labels, mask, targets = make_labeled()
    logits = F.linear(hidden, weight, bias)
    dense = value_and_grads(alpha * LOSSES["jsd"](logits, teacher, mask, reduction="sum")
                            + (1 - alpha) * dense_ce_sum(logits, labels), hidden, weight, bias)
    div, ce = chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, targets, ce_weight=1 - alpha, name="jsd",
                                        chunk_size=3, reduction="sum")
    for d, c in zip(dense, value_and_grads(alpha * div + (1 - alpha) * ce, hidden, weight, bias)):
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)


def test_chunked_with_ce_per_token_and_any_upstream_ratio():
    """Per-token results, and recompute=True with upstream gradients in any ratio, equal the dense path; the
    fused path, which kept the gradient of 0.7·D + 0.3·CE, refuses gradients in another ratio."""
    hidden, weight, bias, teacher, labels, mask, targets = make_labeled()
    logits = F.linear(hidden, weight, bias)
    w_div, w_ce = torch.rand(mask.shape, dtype=torch.float64), torch.rand(mask.shape, dtype=torch.float64)
    d_div = LOSSES["rkl"](logits, teacher, mask, per_token=True)
    d_ce = torch.zeros_like(d_div)
    d_ce[mask] = F.cross_entropy(logits[mask], targets[mask], reduction="none")
    c_div, c_ce = chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, targets, ce_weight=0.3, name="rkl",
                                            chunk_size=3, per_token=True)
    assert c_div.shape == c_ce.shape == mask.shape and (c_ce[~mask] == 0).all()
    dense = value_and_grads((w_div * d_div).sum() + (w_ce * d_ce).sum(), hidden, weight, bias)
    chunked = value_and_grads((w_div * c_div).sum() + (w_ce * c_ce).sum(), hidden, weight, bias)
    for d, c in zip(dense, chunked):
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)

    logits = F.linear(hidden, weight, bias)
    d_div, d_ce = LOSSES["rkl"](logits, teacher, mask), dense_ce_sum(logits, labels) / mask.sum()
    div, ce = chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, targets, ce_weight=0.3, name="rkl",
                                        recompute=True)
    for d, c in zip(value_and_grads(2 * d_div + 5 * d_ce, hidden, weight, bias),
                    value_and_grads(2 * div + 5 * ce, hidden, weight, bias)):
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)
    div, ce = chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, targets, ce_weight=0.3, name="rkl")
    with pytest.raises(RuntimeError, match="not in that ratio"):
        (2 * div + 5 * ce).backward()


def test_chunked_with_ce_all_masked_under_no_grad_and_bad_targets():
    hidden, weight, bias, teacher, labels, mask, targets = make_labeled()
    none = torch.zeros_like(mask)
    div, ce = chunked_divergence_and_ce(hidden, weight, bias, teacher, none, targets, ce_weight=0.5)
    assert div.item() == ce.item() == 0.0
    for grad in torch.autograd.grad(div + ce, (hidden, weight, bias)):
        assert (grad == 0).all()
    logits = F.linear(hidden, weight, bias)
    with torch.no_grad():
        div, ce = chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, targets, ce_weight=0.5, reduction="sum")
    assert not ce.requires_grad
    torch.testing.assert_close(ce, dense_ce_sum(logits, labels).detach())
    bad = targets.clone()
    bad[mask.nonzero()[0].tolist()] = 7  # = V
    with pytest.raises(ValueError, match="token ids"):
        chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, bad, ce_weight=0.5)
    with pytest.raises(ValueError, match="targets must be int64"):
        chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, targets[:, :-1], ce_weight=0.5)
    with pytest.raises(ValueError, match="ce_weight"):
        chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, targets, ce_weight=1.5)


@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_with_ce_keeps_no_student_logits(recompute):
    """As `test_chunked_keeps_no_student_logits`, with the CE computed from the same chunks."""
    hidden, weight, bias, teacher, labels, mask, targets = make_labeled(4, 10, 4, 64)
    big = int(mask.sum()) * 64

    def both():
        div, ce = chunked_divergence_and_ce(hidden, weight, bias, teacher, mask, targets, ce_weight=0.5, chunk_size=4,
                                            recompute=recompute)
        return div + ce

    assert big_saved_tensors(both, big, teacher) == []


def test_default_chunk_size():
    assert default_chunk_size(131072) == 64 and default_chunk_size(32768) == 64 and default_chunk_size(8192) == 256


def test_chunked_rejects_bad_inputs():
    hidden, weight, bias, teacher, mask = make()
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_divergence(hidden, weight, bias, teacher, mask, name="kl")
    with pytest.raises(ValueError, match="hidden size"):
        chunked_divergence(hidden[..., :2], weight, bias, teacher, mask)
    with pytest.raises(ValueError, match="teacher logits"):
        chunked_divergence(hidden, weight, bias, teacher[..., :3], mask)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(hidden, weight, bias, teacher, mask, chunk_size=0)
