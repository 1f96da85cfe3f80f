"""The chunked fused path equals the dense path in value and gradient, and keeps no (B, T, V) tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmdistill.losses import LOSSES, TopK, chunked_divergence
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


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_dense_with_topk_teacher_and_no_bias(name, recompute):
    hidden, weight, _, teacher, mask = make()
    top = teacher.log_softmax(-1).topk(3, dim=-1)
    teacher_k = TopK(top.indices, top.values)
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


@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_keeps_no_student_logits(recompute):
    """Between forward and backward, the chunked path keeps no tensor of N·V elements or more (N unmasked positions)
    other than the teacher logits it was given; the dense path keeps several."""
    b, t, h, v = 2, 8, 4, 64
    hidden, weight, bias, teacher, mask = make(b, t, h, v, dtype=torch.float32)
    big = int(mask.sum()) * v  # both paths only compute the unmasked positions

    def sizes_saved(fn):
        saved = []

        def pack(x):
            if x.numel() >= big and x.data_ptr() != teacher.data_ptr():
                saved.append(tuple(x.shape))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fn()
        out.backward()
        return saved

    assert sizes_saved(lambda: chunked_divergence(hidden, weight, bias, teacher, mask, chunk_size=4, recompute=recompute)) == []
    assert len(sizes_saved(lambda: LOSSES["fkl"](F.linear(hidden, weight, bias), teacher, mask))) >= 2


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
