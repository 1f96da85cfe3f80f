"""Cross-tokenizer KD: character-offset alignment, ULD and the span divergences, the teacher in its own tokens.

Unit tests use hand-built tokenizers: the character tokenizer (student) and ``pair_tokenizer`` (the same
characters plus one token for every pair of digits, and the special tokens at other ids), so that
"46" is one teacher token and two student tokens. The real pair (SmolLM2 ← Qwen2.5) is marked slow.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmdistill.config import ConfigError
from lmdistill.data.align import align_offsets, token_offsets, vocabulary_map
from lmdistill.data.tokenize import collate, encode_rows
from lmdistill.losses import LOSSES, prediction_mask, span_divergence, uld
from lmdistill.methods import METHODS
from lmdistill.methods.distill import KDConfig, aligned_terms, token_distill_terms
from lmdistill.models import CHAR_ALPHABET, CHAR_SPECIALS, build_char_tokenizer
from lmdistill.teachers import Capability, CapabilityError, Needs, Teacher, TokenizerMismatch, check_needs
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config

DIGITS = "0123456789"


def pair_tokenizer() -> PreTrainedTokenizerFast:
    """The character alphabet, then a token per digit pair ("00".."99"), then the specials (other ids than `char`)."""
    from tokenizers import Tokenizer, decoders, models

    pairs = [a + b for a in DIGITS for b in DIGITS]
    vocab = {t: i for i, t in enumerate(CHAR_ALPHABET + tuple(pairs) + CHAR_SPECIALS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a in DIGITS for b in DIGITS], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(vocab: int, seed: int, width: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=True)).eval()


# --- alignment ------------------------------------------------------------------------------------------


def test_align_offsets_by_hand():
    """Text "ab 12": student "ab" " " "1" "2", teacher "a" "b" " " "12".

    Shared ends: 2 ("ab" | "a","b": merged), 3 (" " | " ": one-to-one), 5 ("1","2" | "12": merged).
    With the texts agreeing on 4 characters only, the last group (ending at 5) is left out.
    """
    student = [(0, 2), (2, 3), (3, 4), (4, 5)]
    teacher = [(0, 1), (1, 2), (2, 3), (3, 5)]
    assert align_offsets(student, teacher, 5) == ([0, 1, 2, 2], [0, 0, 1, 2])
    assert align_offsets(student, teacher, 4) == ([0, 1, -1, -1], [0, 0, 1, -1])
    # "é" as two byte-level tokens ending on the same character stays one group with the teacher's one token.
    assert align_offsets([(0, 1), (0, 1), (1, 2)], [(0, 1), (1, 2)], 2) == ([0, 0, 1], [0, 1])


def test_rows_in_both_tokenizers_are_aligned():
    """"46" + "<eos>": the student's "4" "6" form one merged group with the teacher's "46"; "<eos>" is one-to-one."""
    char, pair = build_char_tokenizer(), pair_tokenizer()
    assert token_offsets(pair, "x 1234<eos>") == (
        [pair.convert_tokens_to_ids(t) for t in ["x", " ", "12", "34", "<eos>"]],
        [(0, 1), (1, 2), (2, 4), (4, 6), (6, 11)])
    rows = [{"id": "a", "prompt": "What is 40 + 6?", "response": "46"},
            {"id": "b", "prompt": "1 + 2?", "response": "3"}]
    enc = encode_rows(char, rows, teacher_tokenizer=pair, max_length=40)
    assert enc[0].teacher_response_ids == pair.convert_tokens_to_ids(["46", "<eos>"])
    assert enc[0].teacher_prompt_ids == pair("<bos>What is 40 + 6?\n", add_special_tokens=False)["input_ids"]
    assert (enc[0].student_groups, enc[0].teacher_groups) == ([0, 0, 1], [0, 1])
    assert (enc[1].student_groups, enc[1].teacher_groups) == ([0, 1], [0, 1])
    batch = collate(enc, char.pad_token_id)
    n_s, n_t = enc[0].n_prompt, len(enc[0].teacher_prompt_ids)
    assert batch["student_groups"][0, n_s:n_s + 3].tolist() == [0, 0, 1]
    assert batch["teacher_groups"][0, n_t:n_t + 2].tolist() == [0, 1]
    assert (batch["student_groups"][0, :n_s] == -1).all() and (batch["teacher_groups"][0, :n_t] == -1).all()
    assert batch["teacher_input_ids"][0, n_t:n_t + 2].tolist() == enc[0].teacher_response_ids
    # A response cut by max_length: the teacher keeps the tokens that start inside what the student kept.
    cut = encode_rows(char, [rows[0]], teacher_tokenizer=pair, max_length=len(enc[0].input_ids) - 2)[0]
    assert cut.input_ids[cut.n_prompt:] == char.convert_tokens_to_ids(["4"])
    assert cut.teacher_response_ids == pair.convert_tokens_to_ids(["46"]) and cut.student_groups == [-1]


def test_vocabulary_map_pairs_tokens_by_their_text():
    char, pair = build_char_tokenizer(), pair_tokenizer()
    s_ids, t_ids = vocabulary_map(char, pair)
    assert len(s_ids) == len(CHAR_ALPHABET) + len(CHAR_SPECIALS)  # every character and special; no digit pair
    assert char.convert_ids_to_tokens(s_ids) == pair.convert_ids_to_tokens(t_ids)
    assert pair.convert_tokens_to_ids("<eos>") in t_ids and pair.convert_tokens_to_ids("12") not in t_ids


# --- the losses -----------------------------------------------------------------------------------------


def test_uld_closed_form():
    """s = (0.5, 0.3, 0.2), q = (0.1, 0.6, 0.2, 0.1): sorted and padded, s = (.5, .3, .2, 0), q = (.6, .2, .1, .1),
    Σ|s − q| = .1 + .1 + .1 + .1 = 0.4. Any permutation of the same probabilities (zeros padded) gives 0."""
    s = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1]], dtype=torch.float64).log()
    one = torch.ones(1, dtype=torch.bool)
    assert uld(s, q, one).item() == pytest.approx(0.4, abs=1e-12)
    permuted = torch.tensor([[0.3, 0.0, 0.2, 0.5]], dtype=torch.float64).log()
    assert uld(s, permuted, one).item() == pytest.approx(0.0, abs=1e-12)
    # τ = 2 on logits log p: softmax(log p / 2) = √p / Σ√p.
    st, qt = s.exp().sqrt() / s.exp().sqrt().sum(), q.exp().sqrt() / q.exp().sqrt().sum()
    w = torch.nn.functional.pad(st.sort(descending=True).values, (0, 1)) - qt.sort(descending=True).values
    assert uld(s, q, one, temperature=2.0).item() == pytest.approx(w.abs().sum().item(), abs=1e-12)
    masked = torch.tensor([True, False])
    assert uld(s.expand(2, 3), torch.stack([q[0], q[0] * math.nan]), masked).item() == pytest.approx(0.4)


def test_uld_gradient():
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 7, dtype=torch.float64)
    mask = torch.tensor([True, True, False])
    assert torch.autograd.gradcheck(lambda x: uld(x, q, mask, reduction="sum"), (s,))
    assert torch.autograd.gradcheck(lambda x: uld(q, x, mask, temperature=1.5), (s,))


def test_span_divergence_closed_form_and_gradient():
    """P_S = 0.5, P_T = 0.8: fkl = .8 log(.8/.5) + .2 log(.2/.5); rkl = .5 log(.5/.8) + .5 log(.5/.2); 0 when equal."""
    s = torch.tensor([0.5, 0.3], dtype=torch.float64).log()
    t = torch.tensor([0.8, 0.3], dtype=torch.float64).log()
    mask = torch.tensor([True, False])
    fkl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert span_divergence("fkl", s, t, mask, reduction="sum").item() == pytest.approx(fkl, abs=1e-12)
    rkl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert span_divergence("rkl", s, t, mask, reduction="sum").item() == pytest.approx(rkl, abs=1e-12)
    assert span_divergence("jsd", t, t, torch.ones(2, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-12)
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: span_divergence("jsd", v, t, mask, beta=0.3), (x,))
    # Masked spans do not matter, even at log P = 0 (P = 1) or NaN.
    worse = torch.tensor([0.5, math.nan], dtype=torch.float64).log()
    assert span_divergence("fkl", worse, t, mask, reduction="sum").item() == pytest.approx(fkl, abs=1e-12)


# --- the method's terms ---------------------------------------------------------------------------------


def _terms_inputs(teacher_tok, student, teacher, rows, student_tok=None):
    """(logits, teacher logits, labels, teacher labels, groups, teacher groups, vocab) of `rows` as the method
    sees them (both windows = every position)."""
    student_tok = student_tok or build_char_tokenizer()
    enc = encode_rows(student_tok, rows, teacher_tokenizer=teacher_tok, max_length=40)
    batch = collate(enc, student_tok.pad_token_id)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    vocab = tuple(torch.tensor(i) for i in vocabulary_map(student_tok, teacher_tok))
    return (logits, t_logits, batch["labels"], batch["teacher_labels"], batch["student_groups"],
            batch["teacher_groups"], vocab)


ROWS = [{"id": str(i), "prompt": f"What is {a} + {b}?", "response": str(a + b)}
        for i, (a, b) in enumerate([(40, 6), (1, 2), (17, 25), (3, 99)])]


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_span_alignment_with_one_tokenizer_is_plain_kd(divergence):
    """With the same tokenizer on both sides every token maps one to one (and the map is the identity), so the
    span terms are the plain KD divergence, in value and in gradient; the merged term is 0."""
    char = build_char_tokenizer()
    student, teacher = tiny_llama(len(char), 0), tiny_llama(len(char), 1)
    cfg = KDConfig(divergence=divergence, align="span", alpha=0.7)
    logits, t_logits, labels, t_labels, sg, tg, vocab = _terms_inputs(char, student, teacher, ROWS)
    terms, metrics = aligned_terms(cfg, logits, t_logits, labels, t_labels, sg, tg, vocab)
    plain = token_distill_terms(KDConfig(divergence=divergence, alpha=0.7), logits, t_logits, labels)
    assert terms[f"aligned_{divergence}"].value.item() == pytest.approx(plain[divergence].value.item(), rel=1e-5)
    assert terms[f"span_{divergence}"].value.item() == 0.0
    assert metrics["one_to_one_share"][0] == metrics["one_to_one_share"][1] and metrics["merged_share"][0] == 0
    grads = [torch.autograd.grad(t.value, logits, retain_graph=True)[0] for t in
             (terms[f"aligned_{divergence}"], plain[divergence])]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert terms["ce"].value.item() == pytest.approx(plain["ce"].value.item(), rel=1e-6)


def test_uld_terms_are_zero_for_one_model_and_pair_positions_by_index():
    char, pair = build_char_tokenizer(), pair_tokenizer()
    student = tiny_llama(len(char), 0)
    logits, t_logits, labels, t_labels, sg, tg, vocab = _terms_inputs(char, student, student, ROWS)
    terms, _ = aligned_terms(KDConfig(align="uld"), logits, t_logits, labels, t_labels, sg, tg)
    assert terms["uld"].value.item() == pytest.approx(0.0, abs=1e-6)
    # Another tokenizer: "46<eos>" is 3 student tokens, 2 teacher ones; the first 2 of each pair up.
    teacher = tiny_llama(len(pair), 1)
    logits, t_logits, labels, t_labels, sg, tg, vocab = _terms_inputs(pair, student, teacher, ROWS[:1])
    terms, metrics = aligned_terms(KDConfig(align="uld"), logits, t_logits, labels, t_labels, sg, tg)
    assert metrics["aligned_share"] == (2.0, 3.0)
    s_pos = prediction_mask(labels)[0].nonzero()[:2, 0]
    t_pos = prediction_mask(t_labels)[0].nonzero()[:2, 0]
    want = uld(logits[0, s_pos], t_logits[0, t_pos], torch.ones(2, dtype=torch.bool), reduction="sum")
    assert terms["uld"].value.item() == pytest.approx(want.item(), rel=1e-6)


def test_span_terms_by_hand_on_two_tokenizers():
    """"46<eos>": the student's "4","6" against the teacher's "46" as spans (log P_S = log s(4) + log s(6|4)),
    "<eos>" one to one on the shared tokens; the shares say 2 of 3 tokens merged, 1 one-to-one."""
    char, pair = build_char_tokenizer(), pair_tokenizer()
    student, teacher = tiny_llama(len(char), 0), tiny_llama(len(pair), 1)
    logits, t_logits, labels, t_labels, sg, tg, vocab = _terms_inputs(pair, student, teacher, ROWS[:1])
    terms, metrics = aligned_terms(KDConfig(align="span"), logits, t_logits, labels, t_labels, sg, tg, vocab)
    assert metrics == {"one_to_one_share": (1.0, 3.0), "merged_share": (2.0, 3.0)}
    (s0, s1, s2), (t0, t1) = prediction_mask(labels)[0].nonzero()[:, 0], prediction_mask(t_labels)[0].nonzero()[:, 0]
    s_lp, t_lp = logits[0].log_softmax(-1), t_logits[0].log_softmax(-1)
    ids, t_ids = labels[0], t_labels[0]
    log_ps = s_lp[s0, ids[s0 + 1]] + s_lp[s1, ids[s1 + 1]]
    log_pt = t_lp[t0, t_ids[t0 + 1]]
    p, r = log_pt.exp(), log_ps.exp()
    want = p * (log_pt - log_ps) + (1 - p) * (torch.log1p(-p) - torch.log1p(-r))
    assert terms["span_fkl"].value.item() == pytest.approx(want.item(), rel=1e-5)
    # "<eos>" on the shared tokens, both renormalised over them: softmax over the paired ids.
    s_sub, t_sub = logits[0, s2, vocab[0]].log_softmax(-1), t_logits[0, t1, vocab[1]].log_softmax(-1)
    one = (t_sub.exp() * (t_sub - s_sub)).sum()
    assert terms["aligned_fkl"].value.item() == pytest.approx(one.item(), rel=1e-5)


# --- the capability check and a run ---------------------------------------------------------------------


class _OtherTokenizer(Teacher):
    """A full-logit teacher whose tokenizer is not the student's (as load_teacher marks one, own_vocabulary=True)."""

    capability = Capability.FULL
    name = "local:other"
    shares_vocabulary = False


def test_shared_vocabulary_methods_refuse_a_teacher_with_another_tokenizer():
    for name, method in METHODS.items():
        needs = method.teacher_needs(method.config_class(name=name))
        if needs.capability is None or needs.vocabulary != "shared":
            continue
        with pytest.raises(CapabilityError, match=f"method {name!r} hands the teacher the student's token ids.*"
                                                  "method.align=uld or span"):
            check_needs(name, needs, _OtherTokenizer())
    with_tokenizer = _OtherTokenizer()
    with_tokenizer.tokenizer = pair_tokenizer()
    check_needs("kd", METHODS["kd"].teacher_needs(KDConfig(align="span")), with_tokenizer)
    with pytest.raises(CapabilityError, match="re-encodes the text with the teacher's own tokenizer"):
        check_needs("kd", Needs(Capability.FULL, vocabulary="own"), _OtherTokenizer())


def test_align_is_refused_for_methods_on_student_samples(tmp_path):
    for name in ("gkd", "distillm"):
        with pytest.raises((ConfigError, ValueError), match="method.align=span: this method trains on the student's"):
            tiny_run_config(tmp_path / "x.jsonl", tmp_path / "r", method={"name": name, "align": "span"})


@pytest.fixture(scope="module")
def pair_teacher(data, tmp_path_factory) -> Path:
    """A 2-layer, 48-wide teacher with the pair tokenizer, trained by SFT for 40 steps on `data`: its model dir."""
    root = tmp_path_factory.mktemp("pair_teacher")
    pair_tokenizer().save_pretrained(root / "tokenizer")
    cfg = tiny_run_config(data, root / "run", student={"tokenizer": str(root / "tokenizer"), "n_embd": 48},
                          train={"steps": 40, "lr": 5e-3, "warmup_steps": 5, "log_every": 20})
    fit(cfg, progress=False)
    return cfg.run_dir / "model"


def test_kd_without_align_refuses_a_teacher_with_another_tokenizer(data, pair_teacher, tmp_path):
    cfg = tiny_run_config(data, tmp_path / "kd", method={"name": "kd"},
                          teacher={"kind": "local", "model": {"path": str(pair_teacher)}})
    with pytest.raises(TokenizerMismatch, match="method.align=uld or span"):
        fit(cfg, progress=False)
    assert not (tmp_path / "kd" / "config.yaml").exists()


@pytest.mark.parametrize("align", ["span", "uld"])
def test_cross_tokenizer_kd_run_lowers_the_aligned_divergence(data, pair_teacher, tmp_path, align):
    """A short run of kd with method.align on a teacher with another tokenizer: its aligned terms go down."""
    cfg = tiny_run_config(data, tmp_path / align, method={"name": "kd", "align": align},
                          teacher={"kind": "local", "model": {"path": str(pair_teacher)}},
                          train={"steps": 12, "lr": 1e-2})
    fit(cfg, progress=False)
    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    key = "uld" if align == "uld" else "aligned_fkl"
    first, last = rows[0][key], rows[-1][key]
    assert last < 0.7 * first, (first, last)
    if align == "span":
        assert rows[-1]["span_fkl"] < rows[0]["span_fkl"]
        assert 0 < rows[0]["merged_share"] < 1 and 0 < rows[0]["one_to_one_share"] < 1
    assert (cfg.run_dir / "model" / "config.json").is_file()


# --- sequence-level methods: text crosses, each side in its own tokens -----------------------------------


def _context(cfg, teacher: Teacher, tokenizer):
    from accelerate import Accelerator

    from lmdistill.methods.base import RunContext

    return RunContext(cfg=cfg, tokenizer=tokenizer, accelerator=Accelerator(cpu=True), teacher=teacher)


def test_teacher_reads_the_students_sequences_in_its_own_tokens(data, pair_teacher, tmp_path):
    """in_teacher_tokens: a data batch re-encoded through its text equals the rows encoded in the teacher's tokens;
    teacher_outputs: the teacher's greedy text (its own prompt, its own tokens) in the student's tokens."""
    from lmdistill.config import ModelConfig
    from lmdistill.methods.common import batch_responses, in_teacher_tokens, teacher_outputs
    from lmdistill.teachers.load import load_teacher

    cfg = tiny_run_config(data, tmp_path / "r", teacher={"kind": "local", "model": {"path": str(pair_teacher)}})
    char = build_char_tokenizer()
    teacher = load_teacher(cfg.teacher, char, torch.device("cpu"), own_vocabulary=True)
    assert not teacher.shares_vocabulary
    ctx = _context(cfg, teacher, char)
    batch = collate(encode_rows(char, ROWS, teacher_tokenizer=teacher.tokenizer, max_length=40), char.pad_token_id)
    seen = in_teacher_tokens(ctx, batch)
    n = seen["input_ids"].shape[1]
    mask = batch["teacher_attention_mask"][:, :n]
    assert torch.equal(seen["attention_mask"], mask)  # padding ids differ (each batch pads with its own), masked
    assert torch.equal(seen["input_ids"] * mask, batch["teacher_input_ids"][:, :n] * mask)
    assert torch.equal(seen["labels"], batch["teacher_labels"][:, :n])
    assert teacher.tokenizer.convert_tokens_to_ids("46") in seen["input_ids"][0].tolist()  # the teacher's own "46"
    out = teacher_outputs(ctx, batch, {}, max_new_tokens=6)
    texts = teacher.generate([r["prompt"] for r in ROWS], max_new_tokens=6)
    assert char.batch_decode(batch_responses(out), skip_special_tokens=True) == texts


@pytest.mark.parametrize("method", [{"name": "seqkd", "max_new_tokens": 6},
                                    {"name": "dpkd", "chosen": "data", "max_new_tokens": 6}])
def test_sequence_level_methods_run_with_a_teacher_of_another_tokenizer(data, pair_teacher, tmp_path, method):
    cfg = tiny_run_config(data, tmp_path / method["name"], method=method, train={"steps": 2},
                          teacher={"kind": "local", "model": {"path": str(pair_teacher)}})
    fit(cfg, progress=False)
    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


# --- the real pair: SmolLM2-135M-Instruct (student) ← Qwen2.5-Coder-0.5B-Instruct (teacher) ------------------

SMOLLM2, QWEN = "pypi:smollm2-135m-instruct", "pypi:qwen2.5-coder-0.5b-instruct"


def _need(*names: str) -> None:
    from lmdistill import pretrained

    for name in names:
        if missing := pretrained.missing_packages(name):
            pytest.skip(f"{name} needs {', '.join(missing)}: {pretrained.lookup(name).pip_command}")


@pytest.mark.slow
def test_smollm2_and_qwen_tokenizations_align_by_hand():
    """Two sentences in SmolLM2's and Qwen2.5-Coder's tokens (both byte-level BPE; 39,237 tokens in common).

    "def fibonacci(n): return n" — SmolLM2: def | ␣fib onacci | ( n | ): | ␣return | ␣n;
                                   Qwen:    def | ␣fibonacci  | (n  | ): | ␣return | ␣n
    groups 0 and 3–5 are one-to-one, 1 and 2 merged (two student tokens against one teacher token).
    "Bonjour, ça va? Naïve" — SmolLM2: Bon jour | , | ␣ç ç a | ␣va | ? | ␣Na | ïve
                             Qwen:    Bonjour  | , | ␣ça    | ␣va | ? | ␣Na | ï ve
    SmolLM2 writes "␣ç" as two byte-level tokens, both ending on the character "ç" (offsets (8, 10), (9, 10)):
    they stay in one group. Groups 0 and 2 merge student tokens, group 6 teacher tokens.
    """
    from lmdistill.config import ModelConfig
    from lmdistill.models import load_tokenizer

    _need(SMOLLM2, QWEN)
    student, teacher = load_tokenizer(ModelConfig(path=SMOLLM2)), load_tokenizer(ModelConfig(path=QWEN))

    def pieces(tok, text):
        ids, offsets = token_offsets(tok, text)
        return [text[a:b] for a, b in offsets], offsets

    text = "def fibonacci(n): return n"
    (s, s_off), (t, t_off) = pieces(student, text), pieces(teacher, text)
    assert s == ["def", " fib", "onacci", "(", "n", "):", " return", " n"]
    assert t == ["def", " fibonacci", "(n", "):", " return", " n"]
    assert align_offsets(s_off, t_off, len(text)) == ([0, 1, 1, 2, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])
    text = "Bonjour, ça va? Naïve"
    (s, s_off), (t, t_off) = pieces(student, text), pieces(teacher, text)
    assert s == ["Bon", "jour", ",", " ç", "ç", "a", " va", "?", " Na", "ïve"] and s_off[3:5] == [(8, 10), (9, 10)]
    assert t == ["Bonjour", ",", " ça", " va", "?", " Na", "ï", "ve"]
    assert align_offsets(s_off, t_off, len(text)) == ([0, 0, 1, 2, 2, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 6])
    # The templates agree (ChatML) up to their system prompts; "<|im_end|>" maps to "<|im_end|>".
    s_ids, t_ids = vocabulary_map(student, teacher)
    pairs = dict(zip(student.convert_ids_to_tokens(s_ids), teacher.convert_ids_to_tokens(t_ids)))
    assert len(s_ids) == 39_237 and pairs["<|im_end|>"] == "<|im_end|>" and pairs["Ġreturn"] == "Ġreturn"


@pytest.mark.slow
def test_smollm2_distils_from_qwen_across_tokenizers(tmp_path):
    """kd with method.align=span, alpha=1 (the divergence alone), 3 steps on 4 rows, every step the same batch:
    the one-to-one fkl to Qwen goes down. Each response holds one merged span: SmolLM2 writes " fibonacci" as
    " fib" "onacci", Qwen as one token. About 3 minutes on 2 cores, most of it converting Qwen."""
    import dataclasses
    import json

    _need(SMOLLM2, QWEN)
    rows = [{"id": str(i), "prompt": f"What is fibonacci({k})?", "response": f"It is fibonacci({k}) = {v}."}
            for i, (k, v) in enumerate([(7, 13), (10, 55), (12, 144), (5, 5)])]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_run_config(tmp_path / "rows.jsonl", tmp_path / "run",
                          student={"path": SMOLLM2, "tokenizer": None},
                          teacher={"kind": "local", "model": {"path": QWEN}},
                          method={"name": "kd", "align": "span", "alpha": 1.0},
                          train={"steps": 3, "batch_size": 4, "lr": 1e-4, "warmup_steps": 0, "min_lr_ratio": 1.0})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_path=str(tmp_path / "rows.jsonl"),
                                                            max_length=128))
    fit(cfg, progress=False)
    logged = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert logged[-1]["aligned_fkl"] < logged[0]["aligned_fkl"], logged
    assert logged[0]["one_to_one_share"] > 0.8 and logged[0]["merged_share"] > 0.1  # 2 of 13-15 tokens merged
