"""Tests for lmdistill.data.math: the mathematics_dataset source and its compatibility shim."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest

from lmdistill.data import math as mathdata
from lmdistill.data.math import MATH_MODULES, generate_math, normalize_answer

NUMPY_2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


@pytest.fixture(scope="module")
def md():
    return mathdata._load_mathematics_dataset()


# ---------------------------------------------------------------- the shim


def test_diophantine_alias_runs_and_is_removed_from_sympy(md):
    from sympy.solvers.diophantine.diophantine import base_solution_linear

    diophantine_pkg = importlib.import_module("sympy.solvers.diophantine")
    assert not hasattr(diophantine_pkg, "base_solution_linear")
    assert md.polynomials.diophantine_solve_linear_2d is base_solution_linear

    random.seed(0)
    np.random.seed(0)
    coefficients = np.array([6, -4, 10, 0])
    a, b, c1, c2 = md.polynomials.coefficients_linear_split(coefficients, entropy=8)
    assert list(a * c1 + b * c2) == list(coefficients)


def test_numpy_object_alias_path_runs(md):
    # expand_coefficients builds an np.empty(..., dtype=np.object) and fills it with itemset.
    random.seed(1)
    np.random.seed(1)
    coefficients = np.array([[1, 0], [3, -2]])
    expanded = md.polynomials.expand_coefficients(coefficients, entropy=6)
    assert expanded.dtype == object and expanded.shape == (2, 2)
    for index in np.ndindex(2, 2):
        assert isinstance(expanded[index], list)
        assert sum(expanded[index]) == coefficients[index]


def test_itemset_path_runs(md):
    # sample_coefficients fills an np.zeros(..., dtype=np.int64) with itemset.
    random.seed(2)
    np.random.seed(2)
    coeffs = md.polynomials.sample_coefficients(np.array([3]), entropy=6)
    assert coeffs.shape == (4,) and coeffs[3] != 0
    random.seed(3)
    np.random.seed(3)
    a, b, c1, c2 = md.polynomials.coefficients_linear_split(coeffs, entropy=6)
    assert list(a * c1 + b * c2) == list(coeffs)


def test_itemset_array_semantics():
    array = np.zeros((2, 3), dtype=np.int64).view(mathdata._ItemsetArray)
    array.itemset((1, 2), 7)
    array.itemset(1, 5)  # flat index
    assert array.tolist() == [[0, 5, 0], [0, 0, 7]]
    objects = np.empty((2,), dtype=object).view(mathdata._ItemsetArray)
    objects.itemset((0,), [1, 2])
    assert objects[0] == [1, 2]
    single = np.zeros((1, 1)).view(mathdata._ItemsetArray)
    single.itemset(3.5)
    assert single[0, 0] == 3.5
    with pytest.raises(ValueError):
        array.itemset(1)


@pytest.mark.skipif(not NUMPY_2, reason="NumPy 1 still has np.object and ndarray.itemset")
def test_numpy_and_sympy_namespaces_untouched(md):
    assert "object" not in vars(np)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert not hasattr(np, "object")
    assert not hasattr(np.ndarray, "itemset")
    assert type(np.zeros(2)) is np.ndarray and type(np.empty(2)) is np.ndarray
    assert md.polynomials.np is not np
    assert md.polynomials.np.random is np.random
    # Only polynomials.py sees the stand-in.
    assert importlib.import_module("mathematics_dataset.modules.algebra").np is np


def test_variable_letters_iterate_sorted(md):
    letters = md.composition._ALLOWED_SYMBOLS.difference({"x"}).difference({"a"})
    assert list(letters) == sorted(letters) and "x" not in letters and "e" not in letters


def test_import_has_no_side_effects_and_output_is_hash_seed_independent():
    script = (
        "import json, sys\n"
        "import lmdistill.data.math as m\n"
        "assert not any(n.startswith(('mathematics_dataset', 'absl')) for n in sys.modules)\n"
        "print(json.dumps(m.generate_math(12, seed=5) + m.generate_math(4, seed=5, split='eval')))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == generate_math(12, seed=5) + generate_math(4, seed=5, split="eval")


# ------------------------------------------------------------ generation


@pytest.mark.parametrize("module", MATH_MODULES)
def test_each_default_module_generates(module):
    rows = generate_math(6, modules=[module], seed=0)
    assert len(rows) == 6
    for row in rows:
        assert set(row) == {"id", "prompt", "response", "module"}
        assert row["module"] == module
        assert row["prompt"].strip() and row["response"].strip()
    assert len({row["id"] for row in rows}) == 6


def test_modules_interleaved_round_robin():
    rows = generate_math(10)
    assert [row["module"] for row in rows] == [*MATH_MODULES, *MATH_MODULES, *MATH_MODULES[:2]]
    assert generate_math(0) == []


def test_deterministic_and_seed_dependent():
    first = generate_math(40, seed=3)
    assert generate_math(40, seed=3) == first
    assert generate_math(40, seed=4) != first
    assert generate_math(20, seed=3) == first[:20]


def test_global_rng_state_restored():
    random.seed(99)
    np.random.seed(99)
    expected = (random.random(), np.random.random())
    random.seed(99)
    np.random.seed(99)
    generate_math(8, seed=1)
    assert (random.random(), np.random.random()) == expected


def test_train_and_eval_disjoint():
    train = generate_math(400, split="train", seed=0)
    held = generate_math(120, split="eval", seed=0)
    train_prompts = {row["prompt"] for row in train}
    eval_prompts = {row["prompt"] for row in held}
    assert len(train_prompts) == 400 and len(eval_prompts) == 120
    assert not train_prompts & eval_prompts
    assert not {row["id"] for row in train} & {row["id"] for row in held}

    def bucket(text: str) -> int:
        return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 10

    assert all(bucket(p) == 0 for p in eval_prompts) and all(bucket(p) != 0 for p in train_prompts)


def test_default_modules_emit_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_math(40, seed=8)


def test_difficulty():
    assert generate_math(8, difficulty=0.3) == generate_math(8, difficulty=(0.0, 0.3))

    def mean_answer_length(difficulty: tuple[float, float]) -> float:
        rows = generate_math(60, modules=["arithmetic__mul"], difficulty=difficulty)
        return sum(len(row["response"]) for row in rows) / len(rows)

    assert mean_answer_length((0.0, 0.1)) < mean_answer_length((0.9, 1.0))
    for bad in (-0.1, 1.5, (0.5, 0.2), (0.1, 0.2, 0.3)):
        with pytest.raises(ValueError, match="difficulty"):
            generate_math(4, difficulty=bad)


def test_unknown_module_error_lists_available():
    with pytest.raises(ValueError, match="arithmetic__nope") as info:
        generate_math(4, modules=["arithmetic__mul", "arithmetic__nope"])
    assert all(name in str(info.value) for name in MATH_MODULES)
    with pytest.raises(ValueError, match="numbers__gcd_composed"):
        generate_math(4, modules=["numbers__gcd_composed"])
    assert "numbers__gcd_composed" not in mathdata.available_math_modules()


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate_math(-1)
    with pytest.raises(ValueError):
        generate_math(4, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        generate_math(4, modules=["numbers__gcd", "numbers__gcd"])


def test_exhausted_question_space_raises(monkeypatch):
    monkeypatch.setattr(mathdata, "_MAX_CONSECUTIVE_MISSES", 20)
    monkeypatch.setattr(mathdata, "_split_of", lambda question: "eval")
    with pytest.raises(RuntimeError, match="numbers__gcd"):
        generate_math(2, modules=["numbers__gcd"], split="train")


# ---------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  42 ", "42"),
        ("42.", "42"),
        ("-0", "0"),
        ("+007", "7"),
        ("2.50", "2.5"),
        ("3.0", "3"),
        ("-0.0", "0"),
        (".5", "0.5"),
        ("-12.340", "-12.34"),
        ("1000", "1000"),
        ("1e3", "1e3"),
        ("3/4", "3/4"),
        (" 3 / -4 ", "-3/4"),
        ("2/4", "2/4"),
        ("0/5", "0"),
        ("\u22125", "-5"),
        ("-2 ,3.0", "-2, 3"),
        ("x**2  +\t3*x", "x**2 + 3*x"),
        ("True", "True"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_generated_answers_are_already_normal():
    for row in generate_math(40, seed=2, difficulty=(0.0, 1.0)):
        assert normalize_answer(row["response"]) == row["response"]
