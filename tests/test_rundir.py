"""lmdistill.rundir: what makes a run directory, finished or not, and reading its files back."""

import json

import pytest
import yaml

from lmdistill.config import ConfigError, to_dict
from lmdistill.rundir import (
    RunDirError,
    check_same_config,
    find_runs,
    flatten,
    has_training,
    is_finished,
    is_run_dir,
    read_config,
    read_eval,
    read_metrics,
    read_summary,
    run_name,
    short_keys,
)

from conftest import tiny_run_config


def test_a_run_directory_and_its_stages(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not is_run_dir(run) and not is_finished(run) and not has_training(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": 1, "lr": 0.1}, "data": {"mods": ["a", "b"]}}))
    assert is_run_dir(run) and not has_training(run)
    assert flatten(read_config(run)) == {"train.seed": 1, "train.lr": 0.1, "data.mods": ("a", "b")}
    (run / "metrics.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    assert has_training(run) and not is_finished(run)
    assert read_metrics(run) == read_metrics(run / "metrics.jsonl") == [{"step": 1}, {"step": 2}]
    assert read_eval(run) is None and read_summary(run) is None
    (run / "train_summary.json").write_text(json.dumps({"final": {"flops": 3.0}}))
    (run / "eval.json").write_text(json.dumps({"heldout_ce": 1.5}))
    assert is_finished(run) and read_summary(run)["final"]["flops"] == 3.0 and read_eval(run) == {"heldout_ce": 1.5}


def test_bad_files_are_errors_that_name_file_and_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunDirError, match="not a run directory"):
        read_config(run)
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(RunDirError, match="top level must be a mapping"):
        read_config(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('[1, 2]\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:1: expected a JSON object"):
        read_metrics(run)
    (run / "eval.json").write_text('{\n"a": }')
    with pytest.raises(RunDirError, match=r"eval.json:2: not valid JSON"):
        read_eval(run)


def test_find_runs_in_a_sweep_directory(tmp_path):
    for name in ("b", "a"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "config.yaml").write_text("{}")
    (tmp_path / "sweep" / "not_a_run").mkdir()
    runs = find_runs([tmp_path / "sweep", tmp_path / "sweep" / "a"])
    assert runs == [tmp_path / "sweep" / "a", tmp_path / "sweep" / "b"]  # sorted, each once
    with pytest.raises(RunDirError, match="holds none"):
        find_runs([tmp_path / "sweep" / "not_a_run"])


def test_names_and_short_keys():
    assert short_keys(["method.name", "train.seed", "student.n_layer", "teacher.model.n_layer"]) == {
        "method.name": "method", "train.seed": "seed", "student.n_layer": "student.n_layer",
        "teacher.model.n_layer": "teacher.model.n_layer"}
    assert run_name({"method.alpha": "0.5", "train.seed": "1"}) == "alpha=0.5__seed=1"
    assert run_name({}) == "run"


def test_check_same_config(addition_data, tmp_path):
    cfg = tiny_run_config(addition_data, tmp_path / "run")
    check_same_config(cfg)  # no directory yet
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    check_same_config(cfg)
    other = tiny_run_config(addition_data, tmp_path / "run", train={"lr": 1e-4})
    with pytest.raises(ConfigError, match="different config.*train.lr"):
        check_same_config(other)
