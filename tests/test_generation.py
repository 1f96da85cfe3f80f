"""lmdistill.generation: token-level decoding (sample_ids) and the string-level helpers on top."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lmdistill.config import ModelConfig
from lmdistill import generation
from lmdistill.generation import DECODE_HEAD_ROWS, DecodeHead, InverseCDFSampler, decode_speed, generate_timed, sample_ids, sampling_processors
from lmdistill.models import load_model, load_tokenizer

CHAR = ModelConfig(tokenizer="char", n_layer=2, n_embd=32, n_head=2, max_position=128)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = load_tokenizer(CHAR)
    model = load_model(CHAR, tok, seed=5).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large weights: greedy continuations that depend on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, tok


class Force(LogitsProcessor):
    """Makes `token` the only choice from the `start`-th new token on."""

    def __init__(self, n_prompt: int, token: int, start: int = 0):
        self.n_prompt, self.token, self.start = n_prompt, token, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.n_prompt >= self.start:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0.0
        return scores


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_greedy_equals_model_generate_on_one_prompt(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = _ids(tok, "What is 3 + 4?")
    ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    if tok.eos_token_id in ref:
        ref = ref[: ref.index(tok.eos_token_id) + 1]
    out = sample_ids(model, [prompt], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=12,
                     do_sample=False)
    assert out == [ref]
    assert 1 <= len(ref) <= 12


def test_left_padded_batch_equals_one_prompt_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [_ids(tok, "1+1"), _ids(tok, "What is 12 + 30?"), _ids(tok, "x")]
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=10, do_sample=False)
    batched = sample_ids(model, prompts, **kw)
    assert batched == [sample_ids(model, [p], **kw)[0] for p in prompts]


def test_each_response_ends_at_its_first_eos_kept(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = _ids(tok, "abc")
    eos = tok.eos_token_id
    out = sample_ids(model, [prompt], pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=10, do_sample=True,
                     logits_processor=LogitsProcessorList([Force(len(prompt), eos, start=3)]))
    assert len(out[0]) == 4 and out[0][-1] == eos and eos not in out[0][:-1]


def test_without_eos_a_response_runs_to_max_new_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = _ids(tok, "abc")
    a = _ids(tok, "a")[0]
    out = sample_ids(model, [prompt], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=7,
                     logits_processor=LogitsProcessorList([Force(len(prompt), a)]))
    assert out == [[a] * 7]


def test_a_response_is_never_empty(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = _ids(tok, "abc")
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=5)
    only_pad = sample_ids(model, [prompt], **kw, logits_processor=LogitsProcessorList(
        [Force(len(prompt), tok.pad_token_id)]))
    only_eos = sample_ids(model, [prompt], **kw, logits_processor=LogitsProcessorList(
        [Force(len(prompt), tok.eos_token_id)]))
    assert only_pad == [[tok.eos_token_id]]
    assert only_eos == [[tok.eos_token_id]]


def test_sampling_is_seeded_by_torch_and_the_mode_is_restored(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [_ids(tok, "abc"), _ids(tok, "1+2=")]
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=8, temperature=1.5)
    model.train()
    try:
        torch.manual_seed(0)
        a = sample_ids(model, prompts, **kw)
        assert model.training
        torch.manual_seed(0)
        b = sample_ids(model, prompts, **kw)
    finally:
        model.eval()
    assert a == b
    assert not model.training


def test_generate_timed_counts_lengths_up_to_eos(model_and_tokenizer):
    model, tok = model_and_tokenizer
    gen = generate_timed(model, tok, ["3+4", "12+30"], max_new_tokens=6)
    assert len(gen.texts) == 2 and all(0 <= n <= 6 for n in gen.n_tokens)
    assert sum(gen.n_tokens) <= gen.n_decoded <= sum(gen.n_tokens) + 2


def test_decode_speed_counts_exactly_new_tokens_per_prompt_even_where_eos_comes_first(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    saved = model.lm_head.weight.detach().clone()
    with torch.no_grad():  # every position's argmax is EOS: an ordinary decode would stop at once
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_token_id] = 1.0
    clock = iter([10.0, 12.0])  # the timed decode takes "2 s"
    monkeypatch.setattr("lmdistill.generation.time.perf_counter", lambda: next(clock))
    speed = decode_speed(model, tok, ["1+1", "What is 2 + 2?", "3"], new_tokens=7)
    assert speed == pytest.approx(3 * 7 / 2.0)
    with torch.no_grad():
        model.lm_head.weight.copy_(saved)


# Upper 0.1 % points of the chi-square distribution: a correct sampler fails a test 1 time in 1000.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 9: 27.88}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_inverse_cdf_draws_from_the_softmax():
    """20,000 draws of one row over 10 tokens: the counts fit softmax(scores) (chi-square, 9 df), and the
    processor's output has its argmax at the drawn token and −inf elsewhere."""
    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8]])
    torch.manual_seed(0)
    draws = []
    for _ in range(20000):
        out = InverseCDFSampler()(torch.zeros(1, 1, dtype=torch.long), scores)
        assert torch.isfinite(out).sum() == 1
        draws.append(int(out.argmax()))
    counts = torch.bincount(torch.tensor(draws), minlength=10).double()
    assert chi_square(counts, scores.softmax(-1)[0].double()) < CHI2_999[9]
    # The same test rejects a sampler that is slightly off (temperature 1.1 instead of 1).
    assert chi_square(counts, (scores / 1.1).softmax(-1)[0].double()) > CHI2_999[9]


def test_top_p_and_temperature_match_the_warped_distribution():
    """With top_p=0.8 and temperature 1.5 only the nucleus is drawn, in proportion to its renormalised mass."""
    scores = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(4000, 1)  # 4000 rows, one call
    torch.manual_seed(1)
    picks = sampling_processors(1.5, 0.8)(torch.zeros(4000, 1, dtype=torch.long), scores).argmax(-1)
    p = (scores[0] / 1.5).softmax(-1).double()
    order = p.argsort(descending=True)
    keep = order[: int((p[order].cumsum(0) < 0.8).sum()) + 1]  # the smallest set with mass >= 0.8
    nucleus = torch.zeros_like(p)
    nucleus[keep] = p[keep] / p[keep].sum()
    counts = torch.bincount(picks, minlength=7).double()
    assert 3 <= len(keep) < 7
    assert counts[nucleus == 0].sum() == 0
    assert chi_square(counts[keep], nucleus[keep]) < CHI2_999[len(keep) - 1]


def test_sampled_first_tokens_follow_the_model(model_and_tokenizer):
    """sample_ids end to end: the first sampled token of 3000 copies of one prompt fits the model's own
    next-token distribution at temperature 1.3 over its 5 likeliest tokens (the rest pooled)."""
    model, tok = model_and_tokenizer
    prompt = _ids(tok, "Hi")
    with torch.no_grad():
        p = (model(input_ids=torch.tensor([prompt])).logits[0, -1] / 1.3).softmax(-1).double()
    torch.manual_seed(2)
    first = torch.tensor([s[0] for s in sample_ids(model, [prompt] * 3000, pad_id=tok.pad_token_id, eos_id=-1,
                                                    max_new_tokens=1, temperature=1.3)])
    top = p.argsort(descending=True)[:4]
    probs = torch.cat([p[top], 1 - p[top].sum(0, keepdim=True)])
    counts = torch.stack([(first == t).sum() for t in top] + [(~torch.isin(first, top)).sum()]).double()
    assert chi_square(counts, probs) < CHI2_999[4]


@pytest.mark.parametrize("rows", [1, 3, DECODE_HEAD_ROWS, DECODE_HEAD_ROWS + 1, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_the_decode_head_equals_the_linear_head_in_value_and_shape(rows, bias):
    """W·hᵀ for few rows and the head's own product for many: the same logits to float summation order, on
    the same weight (not a copy)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(48, 1000, bias=bias)
    fast = DecodeHead(head)
    hidden = torch.randn(rows, 1, 48)
    with torch.no_grad():
        out = fast(hidden)
        assert out.shape == (rows, 1, 1000) and out.is_contiguous()
        torch.testing.assert_close(out, head(hidden), rtol=1e-5, atol=1e-5)
        assert fast.head.weight is head.weight


def test_decoding_swaps_the_head_in_and_back_even_on_error(model_and_tokenizer, monkeypatch):
    """sample_ids decodes through a DecodeHead around the model's own head and puts the head back, also
    when generation fails; the tokens are those of the plain head."""
    model, tok = model_and_tokenizer
    head = model.get_output_embeddings()
    prompts = [_ids(tok, "What is 3 + 4?"), _ids(tok, "Hi")]
    seen = []
    real_generate = type(model).generate

    def spy(self, *args, **kwargs):
        seen.append(type(self.get_output_embeddings()))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    torch.manual_seed(3)
    fast = sample_ids(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=10)
    assert seen == [DecodeHead] and model.get_output_embeddings() is head

    with monkeypatch.context() as m:
        m.setattr(generation, "decode_head", lambda model: contextlib.nullcontext())
        torch.manual_seed(3)
        plain = sample_ids(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=10)
    assert seen[-1] is torch.nn.Linear and fast == plain

    def fail(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(model), "generate", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        sample_ids(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=10)
    assert model.get_output_embeddings() is head
