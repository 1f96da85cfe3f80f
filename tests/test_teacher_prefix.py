"""`teacher.prefix`: text a local teacher sees before every sequence (few-shot demonstrations).

The prefixed teacher's logits, with the prefix's keys and values computed once and shared, must
equal those of the whole sequence prefix + row computed from scratch, row by row, at the row's
positions; generation must continue prefix + prompt.
"""

from __future__ import annotations

import pytest
import torch

from lmdistill.config import ConfigError, ModelConfig, RunConfig, TeacherConfig, build
from lmdistill.data import collate, encode_rows
from lmdistill.generation import generate
from lmdistill.models import load_model, load_tokenizer, save_model
from lmdistill.teachers import LocalTeacher
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config

CHAR = ModelConfig(tokenizer="char", n_layer=2, n_embd=32, n_head=2, max_position=128)
PREFIX = "Q: 2+2\nA: 4\nQ: 7+1\nA: 8\n"
ROWS = [{"prompt": "3+4", "response": "7"}, {"prompt": "12+30", "response": "42"}, {"prompt": "5+5", "response": "10"}]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = load_tokenizer(CHAR)
    model = load_model(CHAR, tok, seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large weights: next tokens that depend on the context, not only the last token
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, tok


def test_prefixed_logits_equal_the_whole_sequence_row_by_row(model_and_tokenizer):
    model, tok = model_and_tokenizer
    teacher = LocalTeacher(model, tok, prefix=PREFIX)
    prefix_ids = tok(PREFIX, add_special_tokens=False)["input_ids"]
    assert teacher.prefix_ids == prefix_ids and len(prefix_ids) == len(PREFIX)
    batch = collate(encode_rows(tok, ROWS, max_length=64), tok.pad_token_id)  # right-padded, lengths differ
    am = batch["attention_mask"]
    assert am.sum(1).unique().numel() > 1
    for _ in range(2):  # the shared prefix cache is not changed by a call
        got = teacher.logits(batch["input_ids"], am)  # (B, T, V)
        for i in range(len(ROWS)):
            n = int(am[i].sum())
            whole = torch.tensor([prefix_ids + batch["input_ids"][i, :n].tolist()])
            want = model(input_ids=whole).logits[0, len(prefix_ids):]
            torch.testing.assert_close(got[i, :n], want, atol=1e-5, rtol=1e-5)
    # Scores use the same logits: the log-prob of each row token given prefix + the tokens before it.
    score = teacher.score(batch["input_ids"], am)
    n = int(am[0].sum())
    whole = torch.tensor([prefix_ids + batch["input_ids"][0, :n].tolist()])
    logp = torch.log_softmax(model(input_ids=whole).logits[0], -1)
    P = len(prefix_ids)
    want = torch.stack([logp[P + t - 1, batch["input_ids"][0, t]] for t in range(1, n)])
    torch.testing.assert_close(score[0, 1:n], want, atol=1e-5, rtol=1e-5)
    # Without a prefix the teacher is the plain model.
    plain = LocalTeacher(model, tok).logits(batch["input_ids"], am)
    assert not torch.allclose(plain[0, : int(am[0].sum())], got[0, : int(am[0].sum())], atol=1e-3)


def test_prefixed_generation_continues_prefix_and_prompt(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [r["prompt"] for r in ROWS]
    teacher = LocalTeacher(model, tok, prefix=PREFIX)
    got = teacher.generate(prompts, max_new_tokens=6)
    from lmdistill.data.tokenize import render_prompt

    for p, text in zip(prompts, got):
        ids = tok(PREFIX, add_special_tokens=False)["input_ids"] + tok(render_prompt(tok, p),
                                                                        add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        assert text == tok.decode(out[0, len(ids):], skip_special_tokens=True)
    sampled = []
    for prefix in (PREFIX, None):  # the same random stream, other distributions: other samples
        torch.manual_seed(0)
        sampled.append(LocalTeacher(model, tok, prefix=prefix).generate(prompts, max_new_tokens=6, do_sample=True))
    torch.manual_seed(0)
    assert sampled[0] != sampled[1] and sampled[1] == generate(model, tok, prompts, max_new_tokens=6, do_sample=True)


def test_prefix_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="teacher.prefix is for a local teacher.*kind=server"):
        build(RunConfig, {"teacher": {"kind": "server", "base_url": "http://x/v1", "prefix": "demo"}})
    assert build(TeacherConfig, {"kind": "local", "prefix": "demo"}).prefix == "demo"


@pytest.fixture
def teacher_path(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    save_model(model, tok, tmp_path / "teacher")
    return str(tmp_path / "teacher")


def test_kd_with_a_prefixed_teacher_trains(addition_data, teacher_path, tmp_path):
    cfg = tiny_run_config(addition_data, tmp_path / "run", method={"name": "kd"},
                          teacher={"kind": "local", "model": {"path": teacher_path}, "prefix": PREFIX})
    fit(cfg, progress=False)
    losses = [m["loss"] for m in read_metrics(cfg.run_dir)]
    assert len(losses) == cfg.train.steps and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("method, error", [("hidden", "hidden states .*leave teacher.prefix empty"),
                                           ("minillm", "mixed sampling does not apply teacher.prefix")])
def test_methods_that_run_the_bare_teacher_model_refuse_a_prefix(method, error, addition_data, teacher_path, tmp_path):
    cfg = tiny_run_config(addition_data, tmp_path / "run", method={"name": method},
                          teacher={"kind": "local", "model": {"path": teacher_path}, "prefix": PREFIX})
    with pytest.raises(ValueError, match=error):
        fit(cfg, progress=False)
    assert not (cfg.run_dir / "metrics.jsonl").exists() or not read_metrics(cfg.run_dir)
