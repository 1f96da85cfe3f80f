"""lmdistill.generation: token-level decoding (sample_ids) and the string-level helpers on top."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lmdistill.config import ModelConfig
from lmdistill.generation import decode_speed, generate_timed, sample_ids
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
