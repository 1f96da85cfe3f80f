"""`lmdistill sweep`: the grid, run names, validation before anything runs, and skipping finished runs."""

import json

import pytest
import yaml

from lmdistill.cli import main
from lmdistill.config import ConfigError, to_dict
from lmdistill.rundir import run_name
from lmdistill.sweep import parse_grid, plan, split_values, sweep

from conftest import tiny_run_config


@pytest.fixture
def config(addition_data, tmp_path):
    cfg = tiny_run_config(addition_data, tmp_path / "unused", train={"steps": 2, "eval_every": 0},
                          eval={"n_generate": 2, "max_new_tokens": 3})
    path = tmp_path / "tiny.yaml"
    d = to_dict(cfg)
    del d["output_dir"]
    d["name"] = "tiny"
    path.write_text(yaml.safe_dump(d))
    return path


def test_values_and_axes():
    assert split_values("0,0.5, 1") == ["0", "0.5", "1"]
    assert split_values("[a,b],[c]") == ["[a,b]", "[c]"]
    assert split_values("'x,y',z") == ["'x,y'", "z"]
    fixed, axes = parse_grid(["train.lr=1e-3", "method.alpha=0,0.5", "seed=1,2,3"])
    assert fixed == ["train.lr=1e-3"] and axes == {"method.alpha": ["0", "0.5"], "train.seed": ["1", "2", "3"]}
    assert run_name({"method.name": "kd", "method.alpha": "0.5", "train.seed": "1"}) == "method=kd__alpha=0.5__seed=1"
    # Clashing short names keep the whole key; paths shrink to their file name.
    assert run_name({"student.n_layer": "2", "teacher.model.n_layer": "4"}) == "student.n_layer=2__teacher.model.n_layer=4"
    assert run_name({"data.train_path": "data/dolly.jsonl"}) == "train_path=dolly"
    for bad, match in ((["seed"], "expected key=v1,v2"), (["seed=1", "train.seed=2"], "given twice"),
                       (["seed=1,1"], "repeated"), (["seed=1,,2"], "empty value"), (["x=[1,2"], "unbalanced")):
        with pytest.raises(ConfigError, match=match):
            parse_grid(bad)


def test_plan_builds_every_config_before_running(config, tmp_path):
    root, runs = plan(config, ["method.name=kd,sft", "seed=1,2", "train.lr=1e-2"], tmp_path / "sw")
    assert root == tmp_path / "sw"
    assert [r.name for r in runs] == ["method=kd__seed=1", "method=kd__seed=2", "method=sft__seed=1", "method=sft__seed=2"]
    assert [(r.cfg.method.name, r.cfg.train.seed, r.cfg.train.lr) for r in runs][1] == ("kd", 2, 1e-2)
    assert runs[3].cfg.run_dir == tmp_path / "sw" / "method=sft__seed=2" and runs[3].cfg.name == "tiny__method=sft__seed=2"
    # Overrides apply in command-line order: a method's own option after a method axis is valid for each.
    _, runs = plan(config, ["method.name=gkd,minillm", "method.max_new_tokens=7", "seed=1"], tmp_path / "sw")
    assert [(r.cfg.method.name, r.cfg.method.max_new_tokens) for r in runs] == [("gkd", 7), ("minillm", 7)]
    # A bad value anywhere in the grid stops the sweep before the first run.
    with pytest.raises(ConfigError, match="train.lr"):
        plan(config, ["seed=1,2", "train.lr=1e-3,fast"], tmp_path / "sw")
    with pytest.raises(ConfigError, match="did you mean train.steps"):
        sweep(config, ["train.step=1,2"], out_dir=tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_rerun_skips_finished_runs(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", str(config), "seed=1,2", "train.lr=3e-3", "-o", str(out), "--quiet"]) == 0
    dirs = [out / "seed=1", out / "seed=2"]
    for d in dirs:
        assert (d / "train_summary.json").exists() and (d / "eval.json").exists()
        assert yaml.safe_load((d / "config.yaml").read_text())["train"]["seed"] == int(d.name[-1])
    record = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["trained, evaluated"] * 2
    assert record["command"][:4] == ["lmdistill", "sweep", str(config), "seed=1,2"]
    stamps = [(d / "train_summary.json").stat().st_mtime_ns for d in dirs]

    # A rerun trains nothing and evaluates nothing.
    import lmdistill.sweep

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(lmdistill.sweep, "fit", must_not_run)
    monkeypatch.setattr(lmdistill.sweep, "evaluate_run", must_not_run)
    rows = sweep(config, ["seed=1,2", "train.lr=3e-3"], out_dir=out, progress=False)
    assert [r["status"] for r in rows] == ["skipped (finished)"] * 2
    assert [(d / "train_summary.json").stat().st_mtime_ns for d in dirs] == stamps
    monkeypatch.undo()

    # An unfinished run (no train_summary.json) is run again; the finished one is still skipped.
    (dirs[1] / "train_summary.json").unlink()
    rows = sweep(config, ["seed=1,2", "train.lr=3e-3"], out_dir=out, progress=False)
    assert [r["status"] for r in rows] == ["skipped (finished)", "trained, evaluated"]

    # A directory made with another config is not mistaken for a finished run of this one.
    with pytest.raises(ConfigError, match="different config.*train.lr"):
        sweep(config, ["seed=1,2", "train.lr=1e-3"], out_dir=out, progress=False)
