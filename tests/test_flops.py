"""Compute accounting: one rule for every method (DESIGN.md, "Compute accounting").

6·N_student per token the student is trained on, whichever batch it sits in (data, its own samples,
chosen / rejected sequences); 2·N per token of every other forward (teacher, frozen reference,
sampling, evaluation); generation = its prefill (the prompts' real tokens) plus one position per row
and decoding step after the first. Each test runs one real optimizer step of a method and checks
the logged FLOPs against that closed form, computed from the batch the method made (recorded) and
the widths the decoder produced (recorded).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmdistill.generation as generation
from lmdistill.data import encode_rows, load_rows
from lmdistill.flops import FlopMeter, count_parameters, computed_tokens
from lmdistill.methods import METHODS
from lmdistill.models import build_char_tokenizer, load_model, load_tokenizer
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config


def tokens(batch: dict, prefix: str = "") -> int:
    return int(batch[prefix + "attention_mask"].sum())


def test_meter_counts_trained_and_frozen_forwards_and_cached_generation():
    """A forward with gradient: 6·N per real token; under no_grad: 2·N; `generate` with a KV cache:
    prefill (real prompt tokens) + B per later step."""
    tok = build_char_tokenizer()
    spec = tiny_run_config(Path("x"), Path("y")).student
    model = load_model(spec, tok, seed=0)
    n = count_parameters(model)
    meter = FlopMeter()
    meter.attach(model)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    model(input_ids=ids, attention_mask=am).logits.sum().backward()
    assert meter.train == 6 * n * 6 and meter.other == 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    assert meter.other == 2 * n * 6
    meter.other = 0.0
    generation.sample_ids(model, [[5, 6, 7], [9]], pad_id=tok.pad_token_id, eos_id=-1, max_new_tokens=5)
    assert meter.other == 2 * n * (4 + 2 * 4)  # 4 prompt tokens, then 2 rows x 4 steps
    frozen = load_model(spec, tok, seed=1).requires_grad_(False)
    meter.attach(frozen)
    before = meter.train
    frozen(input_ids=ids, attention_mask=am)  # gradient mode on, but nothing to train
    assert meter.train == before and meter.other == 2 * n * 12 + 2 * n * 6
    assert computed_tokens((), {"input_ids": ids[:, -1:], "attention_mask": am}) == 1


# name -> (method options, teacher options, student-trained prefixes, teacher-forward prefixes)
CASES = {
    "sft": ({"name": "sft"}, None, [""], []),
    "kd": ({"name": "kd"}, {}, [""], [""]),
    "kd-topk-chunked": ({"name": "kd", "chunked": True}, {"k": 4}, [""], [""]),
    "gkd-on-policy": ({"name": "gkd", "lam": 1.0, "max_new_tokens": 4}, {}, [""], [""]),
    "feedback-kl": ({"name": "feedback-kl", "max_new_tokens": 4}, {}, ["", "sample_"], ["", "sample_"]),
    "feedback-kl-no-onpolicy": ({"name": "feedback-kl", "lam_prime": 0.0}, {}, [""], [""]),
    "feedback-kl-score": ({"name": "feedback-kl", "max_new_tokens": 4, "estimator": "score"}, {},
                          ["", "sample_"], ["", "sample_"]),
    "dpkd": ({"name": "dpkd", "max_new_tokens": 4}, {}, ["", "chosen_", "rejected_"], ["chosen_", "rejected_"]),
    "dpo": ({"name": "dpkd", "form": "dpo", "max_new_tokens": 4}, {}, ["", "chosen_", "rejected_"], ["chosen_"]),
    "simpo": ({"name": "dpkd", "form": "simpo", "chosen": "data", "max_new_tokens": 4}, {},
              ["", "chosen_", "rejected_"], ["chosen_"]),
    "minillm": ({"name": "minillm", "max_new_tokens": 4}, {}, ["", "sample_"], ["sample_"]),
    "distillm-fresh": ({"name": "distillm", "init_prob": 1.0, "max_new_tokens": 4}, {}, [""], [""]),
    "seqkd": ({"name": "seqkd", "max_new_tokens": 4}, {}, [""], []),
    "hidden": ({"name": "hidden"}, {}, [""], [""]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_costs_the_closed_form(case, data, teacher_dir, tmp_path, monkeypatch):
    method, teacher_opts, trained, teacher_fwd = CASES[case]
    teacher = None if teacher_opts is None else {"kind": "local", "model": {"path": str(teacher_dir)}, **teacher_opts}
    cfg = tiny_run_config(data, tmp_path / case, teacher=teacher or {}, method=method,
                          train={"steps": 1, "batch_size": 4, "log_every": 1})
    cls = METHODS[method["name"]]
    made: list[dict] = []
    decoded: list[tuple[int, int, int]] = []  # (parameters of the decoding model, real prompt tokens, rows x (width - 1))
    sequences, decode = cls.sequences, generation._decode_batch
    monkeypatch.setattr(cls, "sequences", lambda self, b: made.append(sequences(self, b)) or made[-1])

    def recording_decode(model, prompts, **kw):
        new = decode(model, prompts, **kw)
        decoded.append((count_parameters(model), sum(map(len, prompts)), len(prompts) * (new.shape[1] - 1)))
        mixing = kw.get("logits_processor")
        if mixing:  # MiniLLM's sampler runs the teacher alongside, step by step, with its own KV cache
            decoded.append((count_parameters(mixing[0].teacher), sum(map(len, prompts)),
                            len(prompts) * (new.shape[1] - 1)))
        return new

    monkeypatch.setattr(generation, "_decode_batch", recording_decode)
    fit(cfg, progress=False)

    tok = load_tokenizer(cfg.student)
    n_s = count_parameters(load_model(cfg.student, tok, seed=0))
    n_t = count_parameters(load_model(type(cfg.student)(path=str(teacher_dir)), tok)) if teacher else 0
    (b,) = made
    expected_train = 6 * n_s * sum(tokens(b, p) for p in trained)
    expected_other = 2 * n_t * sum(tokens(b, p) for p in teacher_fwd)
    expected_other += sum(2 * n * (prefill + steps) for n, prefill, steps in decoded)
    if method.get("form") == "dpo":  # the frozen step-0 copy of the student scores chosen and rejected
        expected_other += 2 * n_s * (tokens(b, "chosen_") + tokens(b, "rejected_"))
    if method["name"] == "distillm":  # the validation before step 1, on the first val_rows held-out rows
        held = load_rows(cfg.data)[1][: cfg.method.val_rows]
        val = encode_rows(tok, held, max_length=cfg.data.max_length, truncation=cfg.data.truncation)
        expected_other += 2 * n_s * sum(len(x.input_ids) for x in val)
    row = read_metrics(cfg.run_dir)[0]
    assert row["flops_train"] == pytest.approx(expected_train, rel=1e-9)
    assert row["flops_other"] == pytest.approx(expected_other, rel=1e-9)
    assert row["flops"] == pytest.approx(expected_train + expected_other, rel=1e-9)
    if trained != [""]:  # the fault this pins: samples / pairs were not counted as trained compute
        assert row["flops_train"] > 6 * n_s * tokens(b)


def test_the_on_policy_term_costs_trained_compute(data, teacher_dir, tmp_path):
    """The issue's reproduction: feedback-kl with lam_prime=1 trains on its samples too, so its
    flops_train exceeds lam_prime=0's on the same data (they were equal)."""
    rows = []
    for lam_prime in (0.0, 1.0):
        cfg = tiny_run_config(data, tmp_path / str(lam_prime), method={"name": "feedback-kl", "lam_prime": lam_prime,
                                                                       "max_new_tokens": 4},
                              teacher={"kind": "local", "model": {"path": str(teacher_dir)}}, train={"steps": 2})
        fit(cfg, progress=False)
        rows.append(read_metrics(cfg.run_dir)[-1])
    assert rows[1]["flops_train"] > rows[0]["flops_train"] and rows[1]["flops_other"] > rows[0]["flops_other"]
