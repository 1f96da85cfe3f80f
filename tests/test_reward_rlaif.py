"""`reward-model`, `rlaif` and the listwise preference form `pro` on tiny models; ranked `elicit preferences`.

A synthetic preference a 2-layer model can learn: a response of digits is preferred to one of letters.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

from lmdistill.config import ConfigError, ModelConfig
from lmdistill.data.rows import DataError
from lmdistill.data.tokenize import collate, encode_rows
from lmdistill.elicit import elicit
from lmdistill.flops import count_parameters
from lmdistill.methods import RunContext, load_config, method_rows
from lmdistill.methods.reward_model import sequence_rewards
from lmdistill.methods.rlaif import RLAIF
from lmdistill.models import (build_char_tokenizer, load_model, load_reward_model, load_tokenizer, new_model_config,
                              save_model, save_reward_model)
from lmdistill.teachers import LocalTeacher
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config

DIGITS, LETTERS = "0123456789", "abcdefghij"


def write_pairs(path: Path, n: int, seed: int = 0, *, ranked: bool = False) -> Path:
    """`n` rows: prompt "Q<i>:", chosen digits, rejected letters (3–5 characters); `ranked` adds a middle response
    of both to a `ranking` of three."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            chosen = "".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 5)))
            rejected = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
            row = {"id": f"p{i}", "prompt": f"Q{i}:", "response": chosen, "chosen": chosen, "rejected": rejected}
            if ranked:
                row["ranking"] = [chosen, chosen[:2] + rejected[:2], rejected]
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 96)


@pytest.fixture(scope="module")
def reward_run(pairs, tmp_path_factory):
    """A reward model trained for 40 steps on the digit-over-letter pairs; its config."""
    cfg = tiny_run_config(pairs, tmp_path_factory.mktemp("rm") / "run", method={"name": "reward-model"},
                          train={"steps": 40, "eval_every": 20, "log_every": 1})
    fit(cfg, progress=False)
    return cfg


def heldout_pairs(cfg):
    tok = load_tokenizer(cfg.student)
    _, held = method_rows(cfg)
    return tok, collate(encode_rows(tok, held, max_length=cfg.data.max_length), tok.pad_token_id)


# --------------------------------------------------------------------------- reward-model


def test_reward_model_learns_a_learnable_preference(reward_run):
    """The head starts at 0, so the first loss is exactly log 2; held-out pairwise accuracy ends far above chance."""
    rows = read_metrics(reward_run.run_dir)
    assert rows[0]["bt_loss"] == pytest.approx(math.log(2), abs=1e-6)
    evals = [r for r in rows if "eval_pair_accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["eval_pair_accuracy"] >= 0.9  # chance is 0.5
    assert evals[-1]["eval_reward_margin"] > 0 and rows[-1]["bt_loss"] < 0.3


def test_saved_reward_model_is_a_plain_sequence_classifier_giving_the_logged_accuracy(reward_run):
    """transformers alone loads <run>/model; its scores rank the held-out pairs as the run logged at its end."""
    model = AutoModelForSequenceClassification.from_pretrained(reward_run.run_dir / "model").eval()
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]
    _, batch = heldout_pairs(reward_run)
    with torch.no_grad():
        margin = (model(input_ids=batch["rank0_input_ids"], attention_mask=batch["rank0_attention_mask"]).logits[:, 0]
                  - model(input_ids=batch["rank1_input_ids"], attention_mask=batch["rank1_attention_mask"]).logits[:, 0])
    final = read_metrics(reward_run.run_dir)[-1]
    assert (margin > 0).float().mean().item() == pytest.approx(final["eval_pair_accuracy"], abs=1e-9)
    assert margin.mean().item() == pytest.approx(final["eval_reward_margin"], rel=1e-4, abs=1e-5)


def test_training_scores_equal_the_saved_classifiers(tmp_path):
    """The body + head the method trains score what the saved AutoModelForSequenceClassification scores."""
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    body = LlamaForCausalLM(new_model_config(ModelConfig(tokenizer="char", n_layer=2, n_embd=32, n_head=2), len(tok), tok))
    head = torch.nn.Linear(32, 1, bias=False)
    ids = torch.tensor([[5, 6, 7, 2, 0, 0], [8, 9, 10, 11, 12, 2]])  # right-padded (pad 0), EOS = 2
    am = (ids != 0).long()
    with torch.no_grad():
        want = sequence_rewards(body.eval(), head, ids, am, tok.pad_token_id)
    save_reward_model(body, head.weight, tok, tmp_path / "rm")
    reward, reward_tok = load_reward_model(tmp_path / "rm")
    torch.testing.assert_close(reward(input_ids=ids, attention_mask=am).logits[:, 0], want, rtol=1e-5, atol=1e-6)
    assert reward_tok.get_vocab() == tok.get_vocab()


# --------------------------------------------------------------------------- rlaif


def rlaif_config(pairs: Path, out: Path, reward_dir: Path, **method):
    return tiny_run_config(pairs, out, method={"name": "rlaif", "reward_model": str(reward_dir), "num_samples": 4,
                                               "kl_coef": 0.05, "max_new_tokens": 6, "eval_prompts": 12, **method},
                           train={"steps": 40, "lr": 5e-3, "eval_every": 0, "log_every": 1})


def start_method(cfg) -> tuple[RLAIF, torch.nn.Module]:
    """The rlaif method around the student as `fit` builds it at step 0 (its reference is that student)."""
    tok = load_tokenizer(cfg.student)
    start = load_model(cfg.student, tok, seed=cfg.train.seed)
    ctx = RunContext(cfg=cfg, tokenizer=tok, accelerator=Accelerator(cpu=True), model=start)
    ctx.flops.attach(start)
    return RLAIF(cfg.method, ctx), start


def test_rlaif_raises_the_reward_models_heldout_score_with_a_bounded_kl(pairs, reward_run, tmp_path):
    """From a random student (its samples: random characters, score ≈ 1 of the reward model's ≈ ±2 for all
    digits / all letters), 40 steps raise the held-out mean score by more than 0.5 with the KL to the start
    under 10 nats per sample; a 20 times larger KL coefficient keeps the KL lower."""
    held_kl = {}
    for kl_coef in (0.05, 1.0):
        cfg = rlaif_config(pairs, tmp_path / f"run{kl_coef}", reward_run.run_dir / "model", kl_coef=kl_coef)
        fit(cfg, progress=False)
        method, start = start_method(cfg)
        _, held = method_rows(cfg)
        examples = encode_rows(method.ctx.tokenizer, held, max_length=cfg.data.max_length)
        before = method.heldout_metrics(start, examples)
        after = method.heldout_metrics(load_model(ModelConfig(path=str(cfg.run_dir / "model"))), examples)
        assert before["eval_kl"] == 0.0  # the start is its own reference
        final = read_metrics(cfg.run_dir)[-1]  # the loop's own evaluation at the end: the same samples
        assert final["eval_reward"] == pytest.approx(after["eval_reward"], rel=1e-4, abs=1e-4)
        assert final["eval_kl"] == pytest.approx(after["eval_kl"], rel=1e-3, abs=1e-3)
        held_kl[kl_coef] = after["eval_kl"]
        if kl_coef == 0.05:
            assert after["eval_reward"] > before["eval_reward"] + 0.5, (before, after)
            assert 0 < after["eval_kl"] < 10.0, after  # nats per sample
    assert held_kl[1.0] < held_kl[0.05], held_kl


def test_rlaif_counts_the_reward_model_at_two_n_per_token(pairs, reward_run):
    """One loss call's other-FLOPs are the reference's forward plus 2·N_rm per scored token, exactly."""
    cfg = rlaif_config(pairs, Path("unused"), reward_run.run_dir / "model")
    method, start = start_method(cfg)
    tok = method.ctx.tokenizer
    train_rows, _ = method_rows(cfg)
    batch = collate(encode_rows(tok, train_rows[:2], max_length=cfg.data.max_length), tok.pad_token_id)
    torch.manual_seed(0)
    batch = method.sequences(batch)
    meter = method.ctx.flops
    before = meter.other
    method.loss(start, batch)
    spent = meter.other - before
    reference = method._reference.model  # made by the loss call; measure one more forward of it alone
    from lmdistill.methods.common import trained
    from lmdistill.models import causal_logits

    window, _ = trained(batch, "sample_")
    mark = meter.other
    with torch.no_grad():
        causal_logits(reference, batch["sample_input_ids"], batch["sample_attention_mask"], window)
    reference_flops = meter.other - mark
    scored = float(batch["sample_attention_mask"].sum())  # the char tokenizer appends nothing after EOS
    assert spent == pytest.approx(reference_flops + 2 * count_parameters(method.reward) * scored, rel=1e-12)


@pytest.mark.parametrize("name", ["rlaif", "reward-model"])
def test_resumes_exactly(name, pairs, reward_run, tmp_path):
    """rlaif's reference (the start) and the reward model's head are kept in checkpoints: 2 + 2 steps = 4."""
    def config(out: Path):
        if name == "rlaif":
            cfg = rlaif_config(pairs, out, reward_run.run_dir / "model")
        else:
            cfg = tiny_run_config(pairs, out, method={"name": "reward-model"})
        cfg.train.steps, cfg.train.checkpoint_every = 4, 2
        return cfg

    straight, resumed = config(tmp_path / "a"), config(tmp_path / "b")
    fit(straight, progress=False)
    fit(resumed, stop_after=2, progress=False)
    fit(resumed, progress=False)
    assert [r["loss"] for r in read_metrics(straight.run_dir)] == pytest.approx(
        [r["loss"] for r in read_metrics(resumed.run_dir)], rel=1e-5)


def test_rlaif_bad_keys_are_named(pairs, reward_run, tmp_path):
    with pytest.raises(ConfigError, match="method.reward_model is required"):
        fit(rlaif_config(pairs, tmp_path / "run0", ""), progress=False)
    with pytest.raises(ConfigError, match="num_samples must be >= 2"):
        load_config(None, ["method.name=rlaif", "method.reward_model=x", "method.num_samples=1"])
    lm = tmp_path / "lm"
    tok = build_char_tokenizer()
    save_model(load_model(ModelConfig(tokenizer="char", n_layer=1, n_embd=16, n_head=2), tok), tok, lm)
    cfg = rlaif_config(pairs, tmp_path / "run", lm)
    with pytest.raises(ConfigError, match="not a reward model"):
        fit(cfg, progress=False)
    assert not cfg.run_dir.exists()  # refused before anything was written
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fit(rlaif_config(pairs, tmp_path / "run2", tmp_path / "nowhere"), progress=False)


def test_reward_model_needs_pairs(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"prompt": "a", "response": "b", "chosen": "b", "rejected": "c"}\n'
                   '{"prompt": "a", "response": "b", "chosen": "b"}\n' * 4)
    with pytest.raises(DataError, match=r"rows.jsonl:2: method 'reward-model' needs field 'rejected'"):
        fit(tiny_run_config(bad, tmp_path / "run", method={"name": "reward-model"}), progress=False)


# --------------------------------------------------------------------------- pro


def test_pro_lowers_its_listwise_loss_on_rankings(tmp_path):
    """With lm_weight = 0 the only term is Plackett–Luce over the three ranked responses: it falls from ≈ log 3!."""
    data = write_pairs(tmp_path / "ranked.jsonl", 64, ranked=True)
    cfg = tiny_run_config(data, tmp_path / "run", method={"name": "dpkd", "form": "pro", "chosen": "data",
                                                          "beta": 1.0, "lm_weight": 0.0},
                          train={"steps": 25, "lr": 5e-3})
    fit(cfg, progress=False)
    rows = read_metrics(cfg.run_dir)
    assert abs(rows[0]["pref_loss"] - math.log(6)) < 0.2  # scores of a random student differ little
    assert rows[0]["ranked_responses"] == 3.0
    late = [r["pref_loss"] for r in rows[-5:]]
    assert sum(late) / len(late) < rows[0]["pref_loss"] - 0.5
    assert rows[-1]["reward_accuracy"] == 1.0


def test_pro_options_and_rows_are_checked(pairs, tmp_path):
    with pytest.raises(ConfigError, match="method.form=pro ranks the responses of the data's rows"):
        load_config(None, ["method.name=dpkd", "method.form=pro"])
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "a", "response": "b", "chosen": "b", "rejected": "c"}\n'
                     '{"prompt": "a", "response": "b"}\n' * 4)
    cfg = tiny_run_config(plain, tmp_path / "run", method={"name": "dpkd", "form": "pro", "chosen": "data"})
    with pytest.raises(DataError, match=r"plain.jsonl:2: method.form=pro needs field 'ranking'"):
        fit(cfg, progress=False)
    plain.write_text('{"prompt": "a", "response": "b", "ranking": ["b", "b"]}\n' * 8)
    with pytest.raises(DataError, match=r"plain.jsonl:1: the ranked responses .* repeat one"):
        fit(cfg, progress=False)


# --------------------------------------------------------------------------- elicit preferences, ranked


def tiny_llama(seed: int) -> tuple[LlamaForCausalLM, object]:
    tok = build_char_tokenizer()
    config = new_model_config(ModelConfig(tokenizer="char", n_layer=1, n_embd=32, n_head=2, max_position=128),
                              len(tok), tok)
    config.tie_word_embeddings, config.initializer_range = False, 0.2  # a tied random model answers nothing
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tok


def test_ranked_preferences_with_several_samples(tmp_path):
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i}?"}) + "\n" for i in range(6)))
    t_model, tok = tiny_llama(3)
    s_model, _ = tiny_llama(4)
    overrides = [f"elicit.input_path={inputs}", f"elicit.output={tmp_path / 'out.jsonl'}", f"output_dir={tmp_path / 'run'}",
                 "elicit.rank=true", "elicit.num_samples=3", "elicit.max_new_tokens=6", "elicit.do_sample=true"]
    result = elicit("preferences", load_config(None, overrides), teacher=LocalTeacher(t_model, tok, name="t"),
                    student=(s_model, tok))
    rows = [json.loads(line) for line in result.output.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        ranking, scores = row["ranking"], row["ranking_scores"]
        assert 2 <= len(ranking) <= 4 and len(set(ranking)) == len(ranking)
        assert scores == sorted(scores, reverse=True) and len(scores) == len(ranking)
        assert (row["chosen"], row["rejected"]) == (ranking[0], ranking[-1])
        assert (row["teacher_logprob_chosen"], row["teacher_logprob_rejected"]) == (scores[0], scores[-1])
        assert row["ranking_sources"].count("teacher") == 1 and len(row["provenance"]["student"]["seeds"]) == 3
    with pytest.raises(ConfigError, match="elicit.num_samples above 1 needs elicit.rank=true"):
        load_config(None, ["elicit.num_samples=2"])
