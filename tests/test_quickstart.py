"""The demo: SmolLM2-135M-Instruct pruned and distilled (real model, offline)."""

from __future__ import annotations

import json

import pytest

from lmdistill import quickstart as qs
from lmdistill.rundir import read_eval


def test_every_student_starts_from_the_pruned_teacher_with_one_budget(tmp_path):
    runs = qs.quickstart_configs(tmp_path, 0.1, tuple(qs.STUDENT_METHODS))
    assert list(runs)[:2] == ["teacher", "pruned, untrained"] and len(runs) == 2 + len(qs.STUDENT_METHODS)
    assert runs["teacher"].student.path == qs.TEACHER and runs["teacher"].teacher.kind == "none"
    students = list(runs.values())[1:]
    for cfg in students:  # one budget for every student, each measured against the teacher
        assert cfg.student.path == str(tmp_path / "pruned") and cfg.teacher.model.path == qs.TEACHER, cfg.name
        assert cfg.train == students[0].train and cfg.data == students[0].data, cfg.name
    assert students[0].train.steps == int(qs.STEPS * 0.1)
    with pytest.raises(ValueError, match="unknown method.*ppo"):
        qs.quickstart_configs(tmp_path, 1.0, ("sft", "ppo"))


def test_the_committed_instructions_are_the_teachers_answers_with_provenance():
    rows = [json.loads(line) for line in qs.INSTRUCTIONS.read_text().splitlines()]
    assert len(rows) == 316 and len({r["id"] for r in rows}) == 316
    assert all(r["prompt"] and r["response"] and r["provenance"]["teacher"] == "local:" + qs.TEACHER for r in rows)


def test_table_speed_up_is_relative_to_the_teacher_and_examples_align_by_prompt():
    rows = [{"model": m, "params": p, "rouge_l": r, "heldout_ce": 1.0, "teacher_kl": 0.5, "tokens_per_second": t,
             "train_flops": 0.0, "seconds": 1.0} for m, p, r, t in (("teacher", 135e6, 1.0, 10.0),
                                                                      ("kd", 81e6, 0.4, 16.0))]
    table = qs.format_table(rows).splitlines()
    assert "| teacher | 135.0M | 100.0 |" in table[2] and "| 1.00× |" in table[2]
    assert "| kd | 81.0M | 40.0 |" in table[3] and "| 1.60× |" in table[3]
    evals = {"teacher": {"examples": [{"prompt": "p1", "prediction": "a b"}, {"prompt": "p2", "prediction": "c"}]},
             "kd": {"examples": [{"prompt": "p2", "prediction": "d"}, {"prompt": "p1", "prediction": "e\nf"}]}}
    text = qs.format_examples(evals, n=2)
    assert text.split("\n\n")[0].splitlines() == ["prompt: p1", "  teacher: a b", "  kd:      e f"]
    assert text.split("\n\n")[1].splitlines()[2] == "  kd:      d"


def test_the_demo_end_to_end_at_a_tiny_scale(tmp_path, monkeypatch, capsys):
    """Prune the real teacher, train one student for 2 steps, print table, examples and report; a rerun reuses it."""
    monkeypatch.setattr(qs, "EVAL", {**qs.EVAL, "n_generate": 3, "max_new_tokens": 6, "max_eval_rows": 8})
    monkeypatch.setattr(qs, "PRUNE", {**qs.PRUNE, "calibration_rows": 8})
    monkeypatch.setattr(qs, "SPEED_TOKENS", 4)
    rows = qs.quickstart(tmp_path, scale=0.05, methods=("sft",))
    assert [r["model"] for r in rows] == ["teacher", "pruned, untrained", "sft"]
    teacher, pruned, sft = rows
    assert pruned["params"] < 0.65 * teacher["params"] and sft["params"] == pruned["params"]
    assert teacher["teacher_kl"] == 0.0 and pruned["teacher_kl"] > 0 and sft["train_flops"] > 0
    assert all(r["tokens_per_second"] > 0 for r in rows)
    words = [(" ".join(x["reference"].split()), " ".join(x["prediction"].split()))
             for x in read_eval(tmp_path / "teacher")["examples"]]
    assert all(ref.startswith(pred) for ref, pred in words), words  # the references are its greedy answers
    out = capsys.readouterr().out
    assert "| pruned, untrained |" in out and "prompt: " in out and (tmp_path / "report" / "report.md").is_file()
    assert json.loads((tmp_path / "pruned" / "prune.json").read_text())["num_hidden_layers"]["after"] == 15
    qs.quickstart(tmp_path, scale=0.05, methods=("sft",))
    assert "sft: finished before" in capsys.readouterr().out
