"""Evaluation: every metric against values worked out by hand, then `lmdistill eval` end to end on a tiny run."""

import json
import math

import pytest
import torch

from lmdistill.cli import main
from lmdistill.evaluate.answers import generation_metrics
from lmdistill.evaluate.divergence import divergence_sums, first_response_mask
from lmdistill.evaluate.metrics import LengthBuckets, answer_correct, exact_match, final_answer, rouge_l, text_scores
from lmdistill.evaluate.run import evaluate_path, evaluate_run
from lmdistill.generation import Generations
from lmdistill.heldout import TokenStats, calibration_bins, expected_calibration_error, heldout_stats, token_stats
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.losses import response_ce_sum
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config

X = IGNORE_INDEX


# --------------------------------------------------------------------------- text metrics


def test_rouge_l_by_hand():
    """pred "a b c d", ref "a c e": LCS "a c" = 2 words; P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7."""
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("a c e", "a c e") == 1.0
    # Lower-cased, punctuation dropped, Porter-stemmed: "Running, cats!" = "run cat".
    assert rouge_l("Running, cats!", "run cat") == 1.0
    assert rouge_l("", "a b") == 0.0
    assert rouge_l("x y", "a b") == 0.0


def test_exact_match_squad_normalisation():
    assert exact_match("The  Cat!", "cat")
    assert exact_match("an answer.", "Answer")
    assert not exact_match("cats", "cat")
    assert not exact_match("", "cat")
    # Numbers keep their sign, decimal point and fraction bar; a full stop after them still goes.
    assert not exact_match("-25.6", "256") and not exact_match("3/4", "34") and not exact_match("-7", "7")
    assert exact_match("-25.6.", "-25.6") and exact_match("1,000", "1000") and exact_match("x = -3!", "X = -3")


def test_final_answer_and_accuracy():
    assert final_answer("Work: 3 + 4\nThe answer is -0.50.\nDone") == "-0.50."
    assert final_answer("reasoning\n#### 12") == "12"
    assert final_answer("  -7  \n") == "-7"
    assert final_answer("") == ""
    assert answer_correct("so the answer is -0.50.", "-.5")
    assert answer_correct("3/-4", "-3/4")
    assert answer_correct("+007", "7")
    assert not answer_correct("3/4", "6/8")  # unreduced fractions are different answers
    assert not answer_correct("12", "-12")
    scores = text_scores(["-12", "the cat", "x"], ["12", "a cat", "y"])
    # "-12" vs "12": ROUGE-L ignores the sign (its tokenizer drops punctuation); EM and the answer do not.
    # "the cat" vs "a cat": EM drops articles; ROUGE-L does not (LCS "cat": P = R = 1/2).
    assert scores == {"rouge_l": [1.0, 0.5, 0.0], "exact_match": [0.0, 1.0, 0.0], "accuracy": [0.0, 0.0, 0.0]}


# --------------------------------------------------------------------------- length buckets


def test_length_buckets_by_hand():
    """lengths 1, 2, 3, 4, 10: median 3, mean 4 → ≤3: {1, 2, 3}, (3, 4]: {4}, >4: {10}."""
    b = LengthBuckets.of([1, 2, 3, 4, 10])
    assert (b.median, b.mean, b.bucket) == (3.0, 4.0, [0, 0, 0, 1, 2])
    rows = b.summarize({"rouge_l": [1.0, 0.5, 0.0, 0.25, 0.75]})
    assert [r["n"] for r in rows] == [3, 1, 1]
    assert [r["rouge_l"] for r in rows] == [0.5, 0.25, 0.75]
    # Mean below the median: the middle bucket is empty and has no score.
    b = LengthBuckets.of([1, 5, 5, 6])
    assert (b.median, b.mean, b.bucket) == (5.0, 4.25, [0, 0, 0, 2])
    assert math.isnan(b.summarize({"em": [1, 1, 0, 0]})[1]["em"])


def test_generation_metrics_split_by_reference_length():
    gen = Generations(texts=["1", "22", "x", "4444"], n_tokens=[1, 2, 3, 4], seconds=2.0)
    m = generation_metrics(gen, ["1", "22", "333", "4444"], "chars")  # lengths 1..4: median 2.5, mean 2.5
    assert m["exact_match"] == 0.75 and m["mean_gen_length"] == 2.5 and m["tokens_per_second"] == 5.0
    assert (m["length_median"], m["length_mean"]) == (2.5, 2.5)
    assert [(r["n"], r["exact_match"]) for r in m["buckets"]][0::2] == [(2, 1.0), (2, 0.5)]


# --------------------------------------------------------------------------- calibration


def test_ece_by_hand():
    """M = 4 bins. conf .875, .875 (bin 4, accuracy 1/2): 2/4·|.5 − .875| = .1875;
    .375 (bin 2, correct): 1/4·|1 − .375| = .15625; .125 (bin 1, wrong): 1/4·.125 = .03125. ECE = .375."""
    bins = calibration_bins(torch.tensor([0.875, 0.875, 0.375, 0.125]), torch.tensor([True, False, True, False]), 4)
    assert bins[:, 0].tolist() == [1, 1, 0, 2]
    assert expected_calibration_error(bins) == pytest.approx(0.375)
    # Bins are ((m-1)/M, m/M]: 0.5 falls in bin 2 of 4, 0 in bin 1, 1 in bin 4.
    assert calibration_bins(torch.tensor([0.0, 0.5, 1.0]), torch.ones(3, dtype=torch.bool), 4)[:, 0].tolist() == [1, 1, 0, 1]
    assert math.isnan(expected_calibration_error(torch.zeros(4, 3)))


def test_token_stats_match_cross_entropy_and_a_per_token_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = X
    labels[1, 5:] = X
    labels[2] = X  # a row with nothing to score
    s = token_stats(logits, labels, n_bins=5, chunk=4)  # several chunks
    assert s.ce == pytest.approx(float(response_ce_sum(logits, labels)), rel=1e-5)
    probs = logits[:, :-1].softmax(-1)
    mask = labels[:, 1:] != X
    conf, pred = probs.max(-1)
    correct = pred == labels[:, 1:]
    assert s.tokens == int(mask.sum()) == 8 and s.correct == int(correct[mask].sum())
    # ECE the long way: one bin at a time.
    c, k = conf[mask].double(), correct[mask].double()
    edges = torch.linspace(0, 1, 6, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (c > lo) & (c <= hi) if lo > 0 else (c <= hi)
        if sel.any():
            ece += float(sel.sum()) / len(c) * abs(float(k[sel].mean() - c[sel].mean()))
    assert s.metrics()["ece"] == pytest.approx(ece)
    # Sums survive the trip through a flat tensor (the cross-process reduction).
    back = TokenStats.from_tensor(s.to_tensor())
    assert (back.ce, back.tokens, back.correct) == (pytest.approx(s.ce), s.tokens, s.correct)
    torch.testing.assert_close(back.bins, s.bins)


# --------------------------------------------------------------------------- KL to the teacher


def test_first_response_mask():
    labels = torch.tensor([[X, X, 5, 6], [X, 5, 6, 7], [X, X, X, X]])
    assert first_response_mask(labels).tolist() == [
        [False, True, False, False], [True, False, False, False], [False, False, False, False]]


def test_divergences_to_teacher_by_hand():
    """V = 2, student uniform. Position 1 (first response prediction): teacher (.8, .2), so
    KL(q‖s) = .8 ln(.8/.5) + .2 ln(.2/.5) and KL(s‖q) = .5 ln(.5/.8) + .5 ln(.5/.2).
    Position 2: teacher uniform, both 0. Prompt positions hold a wild teacher that must not count."""
    labels = torch.tensor([[X, X, 1, 0]])
    student = torch.zeros(1, 4, 2)
    teacher = torch.tensor([[[50.0, -50.0], [math.log(0.8), math.log(0.2)], [0.0, 0.0], [-50.0, 50.0]]])
    fkl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    d = divergence_sums(student, teacher, labels)
    assert d["n_first"] == 1 and d["n_all"] == 2
    assert d["fkl_first"] == pytest.approx(fkl) and d["fkl_all"] == pytest.approx(fkl)
    assert d["rkl_first"] == pytest.approx(rkl) and d["rkl_all"] == pytest.approx(rkl)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import write_addition_jsonl

    root = tmp_path_factory.mktemp("eval")
    data = write_addition_jsonl(root / "train.jsonl", 64)
    cfg = tiny_run_config(data, root / "run", train={"steps": 4, "eval_every": 2},
                          eval={"n_generate": 6, "max_new_tokens": 4, "n_generate_train": 4, "ece_bins": 5})
    fit(cfg, progress=False)
    return cfg


def test_training_logs_objective_free_heldout_metrics(tiny_run):
    evals = [m for m in read_metrics(tiny_run.run_dir) if "eval_ce" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert 0 <= m["eval_token_acc"] <= 1 and 0 <= m["eval_ece"] <= 1 and 0 <= m["eval_accuracy"] <= 1


def test_heldout_stats_equal_the_training_loss_path(tiny_run):
    from lmdistill.data import encode_rows, load_rows
    from lmdistill.data.tokenize import collate
    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.config import ModelConfig

    spec = ModelConfig(path=str(tiny_run.run_dir / "model"))
    tok, model = load_tokenizer(spec), load_model(spec)
    _, rows = load_rows(tiny_run.data)
    enc = encode_rows(tok, rows, max_length=tiny_run.data.max_length)
    s = heldout_stats(model, enc, tok.pad_token_id, batch_size=3)  # several batches of unequal padding
    batch = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert s.ce == pytest.approx(float(response_ce_sum(logits, batch["labels"])), rel=1e-5)


def test_eval_run_with_itself_as_teacher(tiny_run, capsys):
    """The model as its own teacher: KL 0, and the teacher's answers and numbers equal the student's."""
    run_dir = tiny_run.run_dir
    code = main(["eval", str(run_dir), "eval.decoding=greedy,sample", "teacher.kind=local",
                 f"teacher.model.path={run_dir / 'model'}"])
    assert code == 0 and "eval.json" in capsys.readouterr().out
    ev = json.loads((run_dir / "eval.json").read_text())
    assert set(ev["decoding"]) == {"greedy", "sample"} and ev["n_generated"] == 6
    assert ev["teacher_kl"]["n_first"] == ev["heldout_rows"] == 8
    for k in ("fkl_first", "rkl_first", "fkl_all", "rkl_all"):
        assert ev["teacher_kl"][k] == pytest.approx(0.0, abs=1e-6)
    assert sum(b["n"] for b in ev["buckets"]) == 6
    t = ev["teacher"]
    assert t["params"] == ev["params"] and t["heldout_ce"] == pytest.approx(ev["heldout_ce"])
    for k in ("rouge_l", "exact_match", "accuracy", "mean_gen_length"):
        assert t[k] == ev[k] == ev["decoding"]["greedy"][k]
    assert ev["tokens_per_second"] > 0 and t["tokens_per_second"] > 0
    # Sampling is seeded: the same samples for the student and the teacher (the same model).
    assert [e["prediction"] for e in t["decoding"]["sample"]["examples"]] == \
        [e["prediction"] for e in ev["decoding"]["sample"]["examples"]]


def test_eval_model_with_config_writes_an_eval_only_run_dir(tiny_run, tmp_path):
    from lmdistill.config import save_config

    cfg_path = tmp_path / "cfg.yaml"
    save_config(tiny_run, cfg_path)
    out = tmp_path / "as_model"
    ev = evaluate_path(str(tiny_run.run_dir / "model"), cfg_path, out)
    assert (out / "config.yaml").exists() and json.loads((out / "eval.json").read_text())["heldout_ce"] == ev["heldout_ce"]
    assert ev["heldout_ce"] == pytest.approx(evaluate_run(tiny_run.run_dir)["heldout_ce"])
    # A training run's directory is never overwritten.
    with pytest.raises(FileExistsError, match="holds a training run"):
        evaluate_path(str(tiny_run.run_dir / "model"), cfg_path, tiny_run.run_dir)
    assert main(["eval", str(tmp_path / "nothing_here")]) == 2


def test_eval_with_a_topk_cache_teacher_over_several_batches(tiny_run, tmp_path):
    """A teacher below `full` (a top-k cache) and held-out rows over several batches: the top-k size
    stays the cache's (it was once overwritten by a loop variable, and the second batch crashed)."""
    import dataclasses

    from lmdistill.cache_teacher import build_cache

    run_dir = tiny_run.run_dir
    teacher = dataclasses.replace(tiny_run.teacher, kind="local", model=dataclasses.replace(
        tiny_run.teacher.model, path=str(run_dir / "model")), cache=str(tmp_path / "cache"), k=8)
    build_cache(dataclasses.replace(tiny_run, teacher=teacher), batch_size=4, progress=False)
    ev = evaluate_run(run_dir, overrides=["teacher.kind=cache", f"teacher.cache={tmp_path / 'cache'}", "teacher.k=8",
                                          f"teacher.model.path={run_dir / 'model'}", "eval.batch_size=3"])
    kl = ev["teacher_kl"]
    assert ev["heldout_rows"] == 8 and kl["n_first"] == 8  # 3 batches of 3, 3, 2 rows
    assert kl["support"] == "top-8 + tail"
    # The student is the cache's teacher: its divergence is only the top-8 truncation's, small and finite.
    for k in ("fkl_first", "rkl_first", "fkl_all", "rkl_all"):
        assert kl[k] is not None and 0 <= kl[k] < 0.5
