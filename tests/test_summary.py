"""summary.json from run directories the tests write by hand (no training): the numbers come out as in the
files, the swept params and seeds are named, mean ± 95 % t-interval over seeds, and bad input is named."""

import json
import math
import statistics
from pathlib import Path

import pytest

from lmdistill.cli import main
from lmdistill.report import ReportError, summarize, write_summary
from lmdistill.report.summary import mean_ci, t_quantile_975

from conftest import write_run


def write_dir(root: Path, name: str, **kwargs) -> Path:
    """A run directory as `fit` + `lmdistill eval` (or an evaluation-only `lmdistill eval -o`) leave it."""
    return write_run(root, name, data="rows.jsonl", **kwargs)


def an_eval(acc: float, ce: float, *, params: int = 1000) -> dict:
    """An eval.json as `lmdistill eval` writes it (the first decoding's numbers also at the top)."""
    greedy = {"rouge_l": acc + 0.1, "exact_match": acc, "accuracy": acc, "mean_gen_length": 3.0, "n": 50,
              "seconds": 0.5, "tokens_per_second": 300.0}
    return {"params": params, "params_non_embedding": params - 100, "heldout_ce": ce, "token_acc": 0.6, "ece": 0.02,
            "teacher_kl": {"support": "full", "n_first": 50, "fkl_first": 0.3, "rkl_first": 0.4, "n_all": 90,
                           "fkl_all": ce / 10, "rkl_all": ce / 5},
            "decoding": {"greedy": greedy}, **{k: v for k, v in greedy.items() if k not in ("n", "seconds")},
            "n_generated": 50, "length_unit": "chars", "buckets": [], "examples": []}


def a_log(final_flops: float, steps: int = 4) -> list[dict]:
    return [{"step": s, "loss": 1.0, "flops": final_flops * s / steps, "flops_train": 0.75 * final_flops * s / steps,
             "flops_other": 0.25 * final_flops * s / steps} for s in range(1, steps + 1)]


ACC = {(0.0, 1): 0.20, (0.0, 2): 0.24, (0.0, 3): 0.22, (1.0, 1): 0.30, (1.0, 2): 0.36, (1.0, 3): 0.33}


@pytest.fixture
def experiment(tmp_path):
    """A teacher, the student before training (evaluation-only directories) and a lam_prime x seed sweep."""
    teacher = write_dir(tmp_path, "teacher", ev=an_eval(0.8, 0.5, params=4000))
    init = write_dir(tmp_path, "student_init", ev=an_eval(0.05, 3.0))
    sweep = tmp_path / "sweep"
    for (lp, seed), acc in ACC.items():
        write_dir(sweep, f"lam_prime={lp:g}__seed={seed}", seed=seed, teacher=str(teacher / "model"),
                  method={"name": "feedback-kl", "lam_prime": lp}, metrics=a_log(100.0 * (1 + lp) * seed),
                  ev=an_eval(acc, 2.0 - acc))
    return teacher, init, sweep


def test_values_come_out_as_in_the_files(experiment):
    teacher, init, sweep = experiment
    s = summarize([sweep], teacher=teacher, student_init=init)
    assert s["teacher"]["accuracy"] == 0.8 and s["teacher"]["heldout_ce"] == 0.5 and s["teacher"]["n_params"] == 4000
    assert s["student_init"]["accuracy"] == 0.05 and s["student_init"]["fkl_all"] == pytest.approx(0.3)
    assert len(s["runs"]) == 6
    run = next(r for r in s["runs"] if r["params"] == {"lam_prime": 1.0} and r["seed"] == 2)
    assert run["method"] == "feedback-kl" and run["steps"] == 4
    assert run["accuracy"] == 0.36 and run["exact_match"] == 0.36 and run["rouge_l"] == pytest.approx(0.46)
    assert run["heldout_ce"] == pytest.approx(1.64) and run["token_acc"] == 0.6
    assert run["fkl_all"] == pytest.approx(0.164) and run["rkl_first"] == 0.4
    assert run["flops"] == pytest.approx(400.0) and run["flops_train"] == pytest.approx(300.0)
    assert run["flops_other"] == pytest.approx(100.0)
    assert run["n_params"] == 1000 and "n" not in run and "seconds" not in run  # counts of the decoding left out


def test_groups_mean_and_t_interval_over_seeds(experiment):
    teacher, init, sweep = experiment
    groups = {g["params"]["lam_prime"]: g for g in summarize([sweep], teacher=teacher, student_init=init)["groups"]}
    assert set(groups) == {0.0, 1.0}
    g = groups[1.0]
    assert g["label"] == "feedback-kl lam_prime=1" and g["method"] == "feedback-kl"
    assert sorted(g["seeds"]) == [1, 2, 3] and g["n"] == 3
    xs = [0.30, 0.36, 0.33]
    assert g["accuracy"]["mean"] == pytest.approx(statistics.fmean(xs))
    assert g["accuracy"]["std"] == pytest.approx(statistics.stdev(xs))
    assert g["accuracy"]["ci95"] == pytest.approx(4.303 * statistics.stdev(xs) / math.sqrt(3))
    assert g["flops"]["mean"] == pytest.approx(400.0)


def test_t_interval():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert t_quantile_975(60) == pytest.approx(2.000, abs=2e-3) and t_quantile_975(10**6) == pytest.approx(1.960, abs=1e-3)
    assert mean_ci([0.5]) == {"mean": 0.5, "ci95": None, "std": None, "n": 1}
    assert mean_ci([None, float("nan")])["n"] == 0
    assert mean_ci([1.0, 3.0])["ci95"] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))


def test_missing_eval_json_is_named(experiment, tmp_path):
    teacher, init, sweep = experiment
    (sweep / "lam_prime=1__seed=3" / "eval.json").unlink()
    with pytest.raises(ReportError, match=r"lam_prime=1__seed=3: no eval.json; evaluate it first"):
        summarize([sweep])
    with pytest.raises(ReportError, match="no eval.json"):
        summarize([sweep / "lam_prime=0__seed=1"], teacher=write_dir(tmp_path, "bare"))


def test_cli_writes_report_and_summary(experiment, tmp_path, capsys):
    teacher, init, sweep = experiment
    out = tmp_path / "out"
    assert main(["report", str(sweep), "-o", str(out), "--summary", "--teacher", str(teacher),
                 "--student-init", str(init)]) == 0
    written = json.loads((out / "summary.json").read_text())
    assert written["teacher"]["accuracy"] == 0.8 and len(written["runs"]) == 6 and len(written["groups"]) == 2
    assert (out / "report.md").is_file() and "summary: " in capsys.readouterr().out
    assert (f"-o {out} --summary --teacher {teacher} --student-init {init}`" in (out / "report.md").read_text())
    (sweep / "lam_prime=0__seed=2" / "eval.json").unlink()
    assert main(["report", str(sweep), "-o", str(tmp_path / "other"), "--summary"]) == 2
    assert "no eval.json" in capsys.readouterr().err


def test_teacher_and_init_given_among_the_runs_are_not_runs(experiment):
    teacher, init, sweep = experiment
    s = write_summary([teacher, init, sweep], sweep.parent / "o", teacher=teacher, student_init=init)
    assert len(json.loads(s.read_text())["runs"]) == 6


def test_numbers_of_the_first_decoding_when_not_at_the_top(tmp_path):
    ev = an_eval(0.4, 1.0)
    for k in ("rouge_l", "exact_match", "accuracy", "mean_gen_length", "tokens_per_second"):
        del ev[k]
    run = write_dir(tmp_path / "runs", "a", metrics=a_log(10.0), ev=ev)
    row = summarize([run])["runs"][0]
    assert row["accuracy"] == 0.4 and row["tokens_per_second"] == 300.0 and "n" not in row
