"""Configs: YAML + overrides, unknown keys named, every shipped config loads."""

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from lmdistill import config
from lmdistill.cli import main
from lmdistill.config import ConfigError, MethodConfig, RunConfig, build, describe, parse_overrides, save_config
from lmdistill.methods import METHOD_CONFIGS, METHODS, load_config

CONFIG_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if "accelerate" not in p.relative_to(CONFIG_DIR).parts)
"""Every run config shipped (configs/accelerate/ holds `accelerate launch` configs, not run configs)."""
SHIPPED = {
    "akl_math.yaml", "context_math.yaml", "distillm_math.yaml", "dpkd_math.yaml", "elicit_context_math.yaml",
    "elicit_label_math.yaml", "feedback_kl_math.yaml", "gkd_math.yaml", "hidden_math.yaml", "kd_math.yaml",
    "kd_mixture_math.yaml", "minillm_math.yaml", "seqkd_math.yaml", "sft_jsonl.yaml", "sft_math.yaml",
    "step_by_step_math.yaml", "self_improve_math.yaml", "elicit_curate.yaml", "elicit_judge.yaml",
    "elicit_preferences_ranked.yaml", "reward_model_instructions.yaml", "rlaif_instructions.yaml",
    "pro_instructions.yaml", "experiments/elicit_instructions.yaml", "experiments/seed000_feedback_kl.yaml",
    "experiments/seed000_feedback_kl_teacher.yaml", "experiments/seed003_methods.yaml",
    "experiments/seed003_methods_instructions.yaml",
}
"""The configs the README and the experiments name: the glob must find each of them."""


def _name(path: Path) -> str:
    return path.relative_to(CONFIG_DIR).as_posix()


@pytest.mark.parametrize("path", CONFIGS, ids=[_name(p) for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert isinstance(cfg.method, METHOD_CONFIGS[cfg.method.name])  # its own options class, not the base


def test_the_known_configs_are_found_and_every_method_has_one():
    found = {_name(p) for p in CONFIGS}
    assert SHIPPED <= found, f"missing from configs/: {sorted(SHIPPED - found)}"
    methods = {load_config(p).method.name for p in CONFIGS}
    assert set(METHODS) <= methods, f"methods without a shipped config: {sorted(set(METHODS) - methods)}"


@dataclasses.dataclass
class ToyOptions(MethodConfig):
    alpha: float = 0.5
    """A toy method's weight."""


def test_config_is_a_leaf_and_resolves_methods_through_the_registry_handed_in():
    """lmdistill.config imports nothing of the package but io, not even inside a function; method
    options come from the `method_configs` it is handed."""
    imported = set()
    for path in Path(config.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module)
    ours = {m for m in imported if m.split(".")[0] == "lmdistill" and not m.startswith("lmdistill.config")}
    assert ours == {"lmdistill.io"}
    cfg = config.load_config(None, ["method.name=toy", "method.alpha=2"], method_configs={"toy": ToyOptions})
    assert isinstance(cfg.method, ToyOptions) and cfg.method.alpha == 2.0
    with pytest.raises(ConfigError, match="method.name: unknown method 'kd'; known: toy"):
        config.load_config(None, ["method.name=kd"], method_configs={"toy": ToyOptions})
    with pytest.raises(TypeError, match="method_configs=lmdistill.methods.METHOD_CONFIGS"):
        build(RunConfig, {"method": {"name": "sft"}})
    assert build(RunConfig, {"train": {"steps": 3}}).train.steps == 3  # no method section: no registry needed


def test_run_help_lists_every_methods_keys(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = capsys.readouterr().out
    assert all(f"  {key} = " in shown for key, _, _ in describe())
    for name, options in METHOD_CONFIGS.items():
        assert all(f"[{name}] {key} = " in shown for key, _, _ in describe(options, "method.") if key != "method.name")


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.lr=3e-4", "train.steps=7", "data.math_modules=numbers__gcd,arithmetic__mul",
                             "train.betas=[0.8,0.9]", "student.path=null", "train.resume=false"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)  # YAML reads 3e-4 as a string
    assert cfg.train.steps == 7
    assert cfg.data.math_modules == ["numbers__gcd", "arithmetic__mul"]
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.resume is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "train.lrr (did you mean train.lr?)"),
        ("trian.lr=1", "unknown config key trian"),
        ("train.steps=many", "train.steps: expected an integer"),
        ("train.mixed_precision=fp8", "train.mixed_precision: 'fp8' is not one of"),
        ("method.name=nope", "method.name: unknown method 'nope'"),
        ("method.alpha=0.5", "unknown config key method.alpha"),
        ("train.resume=maybe", "train.resume: expected true or false"),
        ("trainlr", "expected key=value"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_config(None, [override])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=f"{bad}: unknown config key train.stepz"):
        load_config(bad)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["train.lr=0.01", "name=x", "data.math_modules=numbers__gcd"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]["lr"] == 0.01


def test_every_field_has_help():
    rows = describe()
    missing = [key for key, _, doc in rows if not doc]
    assert not missing, f"fields without a docstring: {missing}"
    assert any(key == "train.lr" for key, _, _ in rows)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=0", "train.lr must be a number > 0, got 0.0"),
        ("train.lr=-1e-3", "train.lr must be a number > 0"),
        ("train.lr=.nan", "train.lr must be a number > 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.steps=0", "train.steps must be >= 1, got 0"),
        ("train.grad_accum=0", "train.grad_accum must be >= 1"),
        ("train.grad_accum=5", "train.batch_size=32 must be divisible by train.grad_accum=5"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio must be in"),
        ("train.betas=[0.9,1.5]", "train.betas must both be in"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
        ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens must be >= 1"),
        ("data.eval_fraction=1.5", "data.eval_fraction must be in"),
        ("data.max_length=1", "data.max_length must be >= 2"),
        ("data.n_train=0", "data.n_train must be >= 1"),
        ("teacher.base_url=localhost:8080", "teacher.base_url='localhost:8080': expected http"),
        ("teacher.base_url=http://h:port/v1", "teacher.base_url='http://h:port/v1': expected http"),
        ("teacher.concurrency=0", "teacher.concurrency >= 1"),
    ],
)
def test_bad_values_are_refused_with_the_key(override, message):
    """Values that cannot run are refused when the config is built, naming the key (issue 14, fault 6)."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_accepted_values_at_the_edges():
    cfg = load_config(None, ["train.steps=1", "train.batch_size=1", "train.lr=1e10", "train.grad_accum=4",
                             "train.batch_size=8", "teacher.base_url=http://[::1]:8080/v1", "train.warmup_steps=0"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.grad_accum) == (1, 8, 4)


def test_a_key_given_twice_in_yaml_is_an_error_naming_file_line_and_key(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  steps: 4\n  lr: 2.0e-3\nmethod:\n  name: sft\n")
    with pytest.raises(ConfigError, match=f"{path}:4: key train.lr is given twice \\(first on line 2\\)"):
        load_config(path)
    path.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match=f"{path}:2: key name is given twice"):
        load_config(path)
    path.write_text("base: &b {lr: 1.0e-3}\ntrain:\n  <<: *b\n  steps: 4\n")  # a merge key overrides by design
    with pytest.raises(ConfigError, match="unknown config key base"):
        load_config(path)


def test_yaml_that_is_not_utf8_or_not_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: run\ntrain:\n  steps: 3 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{path}:3: not UTF-8 text \\(byte 0xe9\\)"):
        load_config(path)
    path.write_text("train: [1, 2\nname: x\n")
    with pytest.raises(ConfigError, match=f"{path}:2: not valid YAML") as info:
        load_config(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a directory"):
        load_config(tmp_path)
