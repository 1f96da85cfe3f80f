"""Reports built from run directories that the tests write by hand (no training): grouping, labels,
mean ± std over seeds, the teacher's row, the tables' numbers, the figures, and bad input."""

import math

import pytest
import yaml

from lmdistill.cli import main
from lmdistill.report import ReportError, curve, find_runs, load_run, organize, write_report

from conftest import write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def buckets(*rouge_em):
    return [{"bucket": b, "n": n, "rouge_l": r, "exact_match": e}
            for b, (n, r, e) in zip(("<= median", "median-mean", "> mean"), rouge_em)]


def log(flops: list[float], ce: list[float], acc: list[float]) -> list[dict]:
    """Metrics lines at steps 1..4 with evaluations at steps 2 and 4."""
    out = []
    for i, step in enumerate((1, 2, 3, 4)):
        m = {"step": step, "loss": 9.0, "flops": step * flops[0] / 2, "flops_train": 0.0}
        if step in (2, 4):
            j = step // 2 - 1
            m.update(flops=flops[j], eval_ce=ce[j], eval_token_acc=acc[j], eval_ece=0.1)
        out.append(m)
    return out


def student_eval(rouge, em, acc, fkl_first, *, teacher_block=None, tps=100.0):
    ev = {"params": 1_000_000, "heldout_ce": 2.0, "token_acc": 0.5, "ece": 0.05, "rouge_l": rouge, "exact_match": em,
          "accuracy": acc, "mean_gen_length": 4.0, "tokens_per_second": tps, "length_unit": "chars",
          "length_median": 3.0, "length_mean": 4.5, "buckets": buckets((3, rouge, em), (1, 0.1, 0.0), (2, 0.05, 0.0)),
          "teacher_kl": {"fkl_first": fkl_first, "rkl_first": 0.5, "fkl_all": 1.0, "rkl_all": 2.0}}
    if teacher_block:
        ev["teacher"] = teacher_block
    return ev


@pytest.fixture
def runs_with_teacher(tmp_path):
    root = tmp_path / "runs"
    teacher = write_run(root, "teacher", seed=0, method={"name": "sft"}, metrics=log([100, 200], [1.5, 1.0], [0.6, 0.7]),
                        ev={"params": 4_000_000, "heldout_ce": 1.0, "rouge_l": 0.5, "exact_match": 0.4, "accuracy": 0.3,
                            "tokens_per_second": 50.0, "buckets": buckets((3, 0.6, 0.5), (1, 0.4, 0.3), (2, 0.2, 0.1))})
    t_path = str(teacher / "model")
    for seed, flops, ce, rouge, fkl in ((1, [10, 20], [3, 2], 0.2, 0.1), (2, [12, 22], [5, 4], 0.3, 0.3)):
        write_run(root, f"kd_a05_s{seed}", seed=seed, method={"name": "kd", "alpha": 0.5}, teacher=t_path,
                  metrics=log(flops, ce, [0.1, 0.2]), ev=student_eval(rouge, 0.1 * seed, 0.0, fkl))
        write_run(root, f"kd_a10_s{seed}", seed=seed, method={"name": "kd", "alpha": 1.0}, teacher=t_path,
                  metrics=log(flops, ce, [0.1, 0.2]), ev=student_eval(0.1, 0.1, 0.0, 0.2))
    write_run(root, "sft_s1", seed=1, method={"name": "sft"}, teacher=t_path, metrics=log([10, 20], [4, 3], [0.1, 0.1]),
              ev=student_eval(0.15, 0.0, 0.0, 0.4))
    return root


def table_rows(md: str, heading: str) -> list[list[str]]:
    """Cells of the first table after `heading` (header excluded)."""
    part = md.split(heading, 1)[1]
    lines = [ln for ln in part.split("\n## ", 1)[0].splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_curve_is_mean_and_std_over_seeds_aligned_by_step(runs_with_teacher):
    runs = [load_run(runs_with_teacher / f"kd_a05_s{s}") for s in (1, 2)]
    xs, ys, ss = curve(runs, "eval_ce")
    assert xs == [11, 21] and ys == [4, 3]
    assert ss == pytest.approx([math.sqrt(2), math.sqrt(2)])


def test_curve_skips_values_logged_as_null(runs_with_teacher):
    """A non-finite number is logged as null (a skipped step); the curve leaves that line out."""
    run = load_run(runs_with_teacher / "kd_a05_s1")
    run.metrics[1]["eval_ce"] = None
    xs, ys, _ = curve([run], "eval_ce")
    assert xs == [20] and ys == [2]


def test_groups_labels_and_teacher_row(runs_with_teacher):
    rows = organize([load_run(p) for p in find_runs([runs_with_teacher])])
    assert [(r.label, len(r.runs), r.teacher) for r in rows] == [
        ("teacher", 1, True), ("kd alpha=0.5", 2, False), ("kd alpha=1", 2, False), ("sft", 1, False)]
    assert {r.task for r in rows} == {"dolly"}


def test_options_added_since_some_runs_ran_do_not_label_them(runs_with_teacher):
    """Runs made by a later lmdistill have config keys the earlier ones lack (new options at their defaults):
    the labels still name only what differs among the runs that have a key."""
    for name in ("kd_a10_s1", "kd_a10_s2", "sft_s1"):  # the earlier runs: no lora sections
        path = runs_with_teacher / name / "config.yaml"
        d = yaml.safe_load(path.read_text())
        del d["student"]["lora"], d["teacher"]["model"]["lora"]
        path.write_text(yaml.safe_dump(d))
    rows = organize([load_run(p) for p in find_runs([runs_with_teacher])])
    assert [r.label for r in rows] == ["teacher", "kd alpha=0.5", "kd alpha=1", "sft"]


def test_an_evaluation_only_model_is_its_own_untrained_row(runs_with_teacher):
    """A pruned start evaluated with the students' config (even method sft) is not a seed of the trained sft."""
    t_path = str(runs_with_teacher / "teacher" / "model")
    pruned = write_run(runs_with_teacher, "pruned_eval", seed=1, method={"name": "sft"}, teacher=t_path,
                       ev=student_eval(0.05, 0.0, 0.0, 2.0))
    d = yaml.safe_load((pruned / "config.yaml").read_text())
    d["student"] = {"path": str(runs_with_teacher / "pruned")}
    (pruned / "config.yaml").write_text(yaml.safe_dump(d))
    rows = organize([load_run(p) for p in find_runs([runs_with_teacher])])
    assert [(r.label, len(r.runs)) for r in rows] == [
        ("teacher", 1), ("kd alpha=0.5", 2), ("kd alpha=1", 2), ("pruned (untrained)", 1), ("sft", 1)]


def test_report_tables_and_figures(runs_with_teacher, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs_with_teacher), "-o", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    for png in ("heldout_ce.png", "accuracy.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC) and f"]({png})" in md

    results = table_rows(md, "## Results")
    assert results[0][:6] == ["teacher", "4.000M", "50.0", "40.0", "30.0", "1"]
    # ROUGE-L .2 and .3 → 25.0 ± 7.1 (sample std √(2·.05²) = .0707); EM .1 and .2 → 15.0 ± 7.1.
    assert results[1][:6] == ["kd alpha=0.5", "1.000M", "25.0 ± 7.1", "15.0 ± 7.1", "0.0 ± 0.0", "2"]
    assert results[3][:6] == ["sft", "1.000M", "15.0", "0.0", "0.0", "1"]

    lengths = table_rows(md, "## By reference length")
    assert lengths[0] == ["teacher", "60.0", "50.0", "40.0", "30.0", "20.0", "10.0"]
    assert lengths[1][:3] == ["kd alpha=0.5", "25.0 ± 7.1", "15.0 ± 7.1"]
    assert "median 3, mean 4.5" in md and "(n=3)" in md

    kl = table_rows(md, "## Divergence to the teacher")
    assert [r[0] for r in kl] == ["kd alpha=0.5", "kd alpha=1", "sft"]  # no KL row for the teacher itself
    assert kl[0][1:] == ["0.2000 ± 0.1414", "0.5000 ± 0.0000", "1.0000 ± 0.0000", "2.0000 ± 0.0000"]

    held = table_rows(md, "## Held-out token metrics")
    assert held[0][:2] == ["teacher", "1.0000"] and held[1][-1] == "21"  # mean final FLOPs of the two seeds

    runs = table_rows(md, "## Runs")
    assert len(runs) == 6


def test_run_without_results_is_left_out_and_named(runs_with_teacher, tmp_path):
    """A sweep's run that has not started yet (config.yaml only) is not counted as a seed."""
    empty = write_run(runs_with_teacher, "sft_s2", seed=2, method={"name": "sft"}, teacher="x")
    md = (tmp_path / "report" / "report.md")
    assert main(["report", str(runs_with_teacher), "-o", str(md.parent)]) == 0
    text = md.read_text()
    assert table_rows(text, "## Results")[3][:6] == ["sft", "1.000M", "15.0", "0.0", "0.0", "1"]
    assert f"Left out, with no results yet (not started or stopped before its first log): {empty}." in text
    with pytest.raises(ReportError, match="no results yet in .*sft_s2"):
        write_report([empty], tmp_path / "other")


def test_teacher_row_from_students_records_one_per_seed(tmp_path):
    """No teacher run given: the teacher's numbers recorded in the students' eval.json, one per seed, per task."""
    root = tmp_path / "sweep"
    block = {"name": "local:t", "params": 9_000_000, "rouge_l": 0.6, "exact_match": 0.5, "accuracy": 0.4,
             "tokens_per_second": 10.0}
    for seed in (1, 2):
        for lam in (0, 1):
            write_run(root, f"lam={lam}__seed={seed}", seed=seed, method={"name": "feedback-kl", "lam_prime": lam},
                      teacher="t", metrics=log([10, 20], [3, 2], [0.1, 0.2]),
                      ev=student_eval(0.2, 0.1, 0.1 * seed, 0.1, teacher_block={**block, "accuracy": 0.4 + 0.1 * seed},
                                      tps=40.0))
    write_run(root, "math__seed=1", seed=1, method={"name": "feedback-kl", "lam_prime": 0}, teacher="t", math_task=True,
              metrics=log([10, 20], [3, 2], [0.1, 0.2]), ev=student_eval(0.3, 0.3, 0.3, 0.1))
    report = write_report([root], tmp_path / "out")
    md = report.markdown.read_text()
    results = table_rows(md, "## Results")
    assert [r[0] for r in results] == ["teacher", "feedback-kl lam_prime=0", "feedback-kl lam_prime=1"]
    # dolly columns: teacher accuracy .5 (seed 1) and .6 (seed 2), not four values; math: no teacher record there.
    assert results[0][2:6] == ["60.0 ± 0.0", "50.0 ± 0.0", "55.0 ± 7.1", "2"]
    assert results[0][6:] == ["–", "–", "–", "–"]
    assert results[1][6:] == ["30.0", "30.0", "30.0", "1"]
    speed = table_rows(md, "## Size and generation speed")
    assert speed[0][3:] == ["40 ± 0", "9.000M", "10 ± 0", "4.00x"]


def test_bad_input_is_named(tmp_path):
    root = tmp_path / "runs"
    run = write_run(root, "r", seed=1, method={"name": "sft"}, metrics=[{"step": 1}])
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, oops}\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:2"):
        write_report([run], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no config.yaml"):
        find_runs([tmp_path / "empty"])
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
