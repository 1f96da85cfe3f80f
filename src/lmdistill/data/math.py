"""Math question/answer rows from DeepMind's ``mathematics_dataset`` generator.

The generator (PyPI ``mathematics-dataset`` 1.0.1) was written for NumPy < 1.24
and SymPy < 1.6 and, as released, cannot be imported or run on newer ones.  It is loaded
lazily, on the first call to :func:`generate_math`, through a small
compatibility shim (see :func:`_load_mathematics_dataset`); importing this
module has no side effects and needs no network.

Split rule: a question belongs to the ``"eval"`` split iff
``int(sha1(question_text.encode()).hexdigest(), 16) % 10 == 0``, else to
``"train"``.  Generation for a split discards questions of the other split and
duplicates, so the splits never share a question text and rows are unique
within a split.  The two splits also draw from different seed streams.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import numbers
import random
import re
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import numpy as np

__all__ = ["DEFAULT_DIFFICULTY", "MATH_MODULES", "answer_correct", "available_math_modules", "final_answer", "generate_math",
           "normalize_answer"]

MATH_MODULES: tuple[str, ...] = (
    "arithmetic__add_or_sub",
    "arithmetic__mul",
    "algebra__linear_1d",
    "numbers__gcd",
)

# The generator's "train-easy" regime: the lowest third of each module's
# training entropy range.
DEFAULT_DIFFICULTY: tuple[float, float] = (0.0, 1.0 / 3.0)

_SPLIT_BUCKETS = 10
_EVAL_BUCKET = 0
# Consecutive rejected samples (duplicate, other split, too long) after which a
# module's question space is taken to be exhausted at the requested difficulty.
_MAX_CONSECUTIVE_MISSES = 5000


# --------------------------------------------------------------------------
# Compatibility shim for mathematics_dataset 1.0.1
# --------------------------------------------------------------------------


class _ItemsetArray(np.ndarray):
    """``ndarray`` that still has ``itemset``, which NumPy 2 removed."""

    def itemset(self, *args: Any) -> None:
        """Set one element, with NumPy 1's ``ndarray.itemset`` semantics."""
        if len(args) == 1:
            if self.size != 1:
                raise ValueError("can only convert an array of size 1 to a Python scalar")
            index: Any = (0,) * self.ndim
            value = args[0]
        elif len(args) == 2:
            index, value = args
            if not isinstance(index, tuple):
                index = np.unravel_index(index, self.shape)
        else:
            raise TypeError(f"itemset() takes 1 or 2 arguments ({len(args)} given)")
        # A full integer index stores `value` as one element, even a list in
        # an object array, exactly like itemset did.
        self[tuple(index)] = value


class _PolynomialsNumpy(types.ModuleType):
    """Stand-in for ``numpy`` seen only by ``mathematics_dataset.sample.polynomials``.

    Everything is NumPy's own object except ``object`` (the alias NumPy 1.24
    removed) and ``zeros``/``empty``, whose arrays are viewed as
    :class:`_ItemsetArray`: in that module every array on which ``itemset``
    is called is created by one of these two functions.
    """

    object = object

    def __init__(self) -> None:
        super().__init__("numpy", "numpy, as seen by mathematics_dataset.sample.polynomials")

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> np.ndarray:
        return np.zeros(*args, **kwargs).view(_ItemsetArray)

    @staticmethod
    def empty(*args: Any, **kwargs: Any) -> np.ndarray:
        return np.empty(*args, **kwargs).view(_ItemsetArray)


class _SortedSymbols(frozenset):
    """Set of variable letters that iterates in sorted order.

    ``composition.Context.pop`` picks a variable name with
    ``random.choice(list(allowed_letters))``; the order of a plain set of
    strings depends on ``PYTHONHASHSEED``, so seeded output would differ
    between processes.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(frozenset.__iter__(self)))

    def difference(self, *others: Any) -> _SortedSymbols:
        return _SortedSymbols(frozenset.difference(self, *others))


_load_lock = threading.Lock()
_loaded: types.SimpleNamespace | None = None
# Generation reseeds process-global RNGs; concurrent calls must not interleave.
_generate_lock = threading.Lock()


def _load_mathematics_dataset() -> types.SimpleNamespace:
    """Import mathematics_dataset once, applying the narrowest patches that make it run.

    1. ``sample/polynomials.py`` does ``from sympy.solvers.diophantine import
       base_solution_linear``; SymPy 1.6 moved it to
       ``sympy.solvers.diophantine.diophantine`` with unchanged semantics.  The
       alias is put on the package only for the duration of the import and
       removed afterwards, so SymPy's namespace is left as it was.
    2. ``np.object`` and 3. ``ndarray.itemset`` are used only in that same
       module; its global ``np`` is rebound to :class:`_PolynomialsNumpy`.
       The real ``numpy`` module and ``np.ndarray`` are not touched.
    4. (determinism) ``composition._ALLOWED_SYMBOLS`` becomes a
       :class:`_SortedSymbols`.

    Importing the package also imports ``absl.logging`` (a declared
    dependency), which registers its logging flags in ``absl.flags.FLAGS``
    and creates the ``"absl"`` logger; no handler is installed and nothing is
    printed.  The package's ``generate`` scripts (absl app/flags) are not
    imported.
    """
    global _loaded
    with _load_lock:
        if _loaded is not None:
            return _loaded
        diophantine_pkg = importlib.import_module("sympy.solvers.diophantine")
        alias_added = not hasattr(diophantine_pkg, "base_solution_linear")
        if alias_added:
            diophantine_impl = importlib.import_module("sympy.solvers.diophantine.diophantine")
            diophantine_pkg.base_solution_linear = diophantine_impl.base_solution_linear
        try:
            polynomials = importlib.import_module("mathematics_dataset.sample.polynomials")
            composition = importlib.import_module("mathematics_dataset.util.composition")
            modules = importlib.import_module("mathematics_dataset.modules.modules")
            settings = importlib.import_module("mathematics_dataset.generate_settings")
        finally:
            if alias_added:
                del diophantine_pkg.base_solution_linear
        if "object" not in vars(np) or not hasattr(np.ndarray, "itemset"):
            polynomials.np = _PolynomialsNumpy()
        composition._ALLOWED_SYMBOLS = _SortedSymbols(composition._ALLOWED_SYMBOLS)
        _loaded = types.SimpleNamespace(
            polynomials=polynomials,
            composition=composition,
            modules=modules,
            max_question_length=settings.MAX_QUESTION_LENGTH,
            max_answer_length=settings.MAX_ANSWER_LENGTH,
        )
        return _loaded


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------


def _difficulty_range(difficulty: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(difficulty, numbers.Real):
        low, high = 0.0, float(difficulty)
    else:
        bounds = tuple(difficulty)
        if len(bounds) != 2:
            raise ValueError(f"difficulty must be a float or a (low, high) pair, got {difficulty!r}")
        low, high = float(bounds[0]), float(bounds[1])
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"difficulty must be a float or (low, high) with 0 <= low <= high <= 1, got {difficulty!r}")
    return low, high


def _is_composed(sampler: Callable[[], Any], composition: types.ModuleType) -> bool:
    """Whether a module may nest other modules' questions in its own.

    Those questions are not reproducible from a seed: ``composition.expand_entities``
    orders the nested descriptions by iterating a set of objects hashed by
    memory address.  Such modules are the ``*_composed`` ones plus
    ``polynomials__add``/``compose``, all built with ``max_modules > 1``.
    """
    if not isinstance(sampler, functools.partial):
        return False
    args = (*sampler.args, *sampler.keywords.values())
    return any(isinstance(arg, composition.PreSampleArgs) and arg.max_modules > 1 for arg in args)


def _train_modules(low: float, high: float) -> dict[str, Callable[[], Any]]:
    """The generator's non-composed training modules, entropy restricted to [low, high] of each range."""
    loaded = _load_mathematics_dataset()

    def entropy_fn(entropy_range: tuple[float, float]) -> tuple[float, float]:
        start, stop = entropy_range
        return start + low * (stop - start), start + high * (stop - start)

    flat: dict[str, Callable[[], Any]] = {}

    def add(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            name = f"{prefix}__{key}"
            if isinstance(value, dict):
                add(value, name)
            elif not _is_composed(value, loaded.composition):
                flat[name] = value

    for group, module in loaded.modules.all_.items():
        add(module.train(entropy_fn), group)
    return dict(sorted(flat.items()))


def available_math_modules() -> tuple[str, ...]:
    """Names accepted by :func:`generate_math` (imports mathematics_dataset on first use)."""
    return tuple(_train_modules(*DEFAULT_DIFFICULTY))


def _text_hash(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def _split_of(question: str) -> Literal["train", "eval"]:
    return "eval" if _text_hash(question) % _SPLIT_BUCKETS == _EVAL_BUCKET else "train"


def _stream_seed(seed: int, split: str, module: str) -> int:
    digest = hashlib.sha256(f"lmdistill.data.math|{seed}|{split}|{module}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@contextmanager
def _seeded_global_rngs() -> Iterator[Callable[[int], None]]:
    """Yield a function that seeds the RNGs the generator draws from; restore their states on exit.

    mathematics_dataset samples from Python's global ``random``, NumPy's global
    RNG and SymPy's module RNG (``sympy.core.random.rng``, used by ``randprime``).
    """
    sympy_random = importlib.import_module("sympy.core.random")
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    sympy_state = sympy_random.rng.getstate()

    def reseed(stream_seed: int) -> None:
        random.seed(stream_seed)
        np.random.seed(stream_seed % 2**32)
        sympy_random.rng.seed(stream_seed)

    try:
        yield reseed
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        sympy_random.rng.setstate(sympy_state)


def generate_math(
    n: int,
    *,
    modules: Sequence[str] = MATH_MODULES,
    split: Literal["train", "eval"] = "train",
    seed: int = 0,
    difficulty: float | tuple[float, float] = DEFAULT_DIFFICULTY,
) -> list[dict]:
    """Generate ``n`` math question/answer rows with DeepMind's mathematics_dataset.

    Returns rows ``{"id", "prompt", "response", "module"}``: ``prompt`` is the
    question text, ``response`` the generator's answer (e.g. ``"-12"``,
    ``"0.35"``, ``"7"``), ``id`` a stable content hash.  Modules are
    interleaved round-robin in the order given; each gets ``n // k`` rows
    and the first ``n % k`` one more.  Each (seed, split, module) is its own
    seed stream, so the result is identical across calls and processes and
    the first rows of a larger ``n`` equal those of a smaller one (when both
    are multiples of ``len(modules)``).  Global ``random``/NumPy/SymPy RNG
    states are restored afterwards (other threads drawing from them meanwhile
    would break reproducibility; concurrent calls to this function are
    serialised).

    ``split`` selects the train or eval side of the hash split described in
    the module docstring: no question text occurs in both, and none twice.

    ``difficulty`` is the part of each module's training entropy range to
    sample from, as fractions of it: ``(low, high)`` with
    ``0 <= low <= high <= 1``, or a float ``d`` for ``(0, d)``.  The default
    ``(0, 1/3)`` is the generator's "train-easy"; ``(0, 1)`` is its full
    training range.

    Raises ``ValueError`` for an unknown module name (listing the available
    ones) or bad arguments, and ``RuntimeError`` if a module runs out of new
    questions at this difficulty.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if isinstance(modules, str):
        modules = (modules,)
    modules = tuple(modules)
    if not modules:
        raise ValueError("modules must name at least one module")
    if len(set(modules)) != len(modules):
        raise ValueError(f"modules contains duplicates: {modules!r}")
    low, high = _difficulty_range(difficulty)

    available = _train_modules(low, high)
    unknown = [name for name in modules if name not in available]
    if unknown:
        raise ValueError(f"unknown math module(s) {unknown}; available: {', '.join(available)}")

    loaded = _load_mathematics_dataset()
    n = int(n)
    quotas = [n // len(modules) + (i < n % len(modules)) for i in range(len(modules))]
    seen: set[str] = set()
    per_module: list[list[dict]] = []
    with _generate_lock, _seeded_global_rngs() as reseed:
        for name, quota in zip(modules, quotas):
            reseed(_stream_seed(seed, split, name))
            sample = available[name]
            rows: list[dict] = []
            misses = 0
            while len(rows) < quota:
                problem = sample()
                question, answer = str(problem.question), str(problem.answer)
                if (
                    len(question) > loaded.max_question_length
                    or len(answer) > loaded.max_answer_length
                    or question in seen
                    or _split_of(question) != split
                ):
                    misses += 1
                    if misses > _MAX_CONSECUTIVE_MISSES:
                        raise RuntimeError(
                            f"math module {name!r} produced no new {split} question in {misses} tries after "
                            f"{len(rows)} rows at difficulty {(low, high)}: ask for fewer rows or raise the difficulty"
                        )
                    continue
                misses = 0
                seen.add(question)
                rows.append(
                    {
                        "id": f"math-{hashlib.sha1(question.encode('utf-8')).hexdigest()[:16]}",
                        "prompt": question,
                        "response": answer,
                        "module": name,
                    }
                )
            per_module.append(rows)

    return [rows[i] for i in range(max(quotas)) for rows in per_module if i < len(rows)]


# --------------------------------------------------------------------------
# Answer normalisation
# --------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?\d+")
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_FRACTION_RE = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")


def _normalize_number(text: str) -> str | None:
    if _INT_RE.fullmatch(text):
        return str(int(text))
    if _DECIMAL_RE.fullmatch(text):
        try:
            value = Decimal(text)
        except InvalidOperation:
            return None
        if value == 0:
            return "0"
        return format(value.normalize(), "f")
    match = _FRACTION_RE.fullmatch(text)
    if match:
        numerator, denominator = int(match.group(1)), int(match.group(2))
        if denominator < 0:
            numerator, denominator = -numerator, -denominator
        if numerator == 0:
            return "0"
        return f"{numerator}/{denominator}"
    return None


def normalize_answer(text: str) -> str:
    """Canonical form of a final answer, for exact-match accuracy.

    Collapses whitespace, strips trailing periods, and writes numbers
    canonically: integers without sign noise or leading zeros (``"-0"`` ->
    ``"0"``, ``"+007"`` -> ``"7"``), decimals without trailing zeros
    (``"2.50"`` -> ``"2.5"``, ``"3.0"`` -> ``"3"``, ``".5"`` -> ``"0.5"``), and
    fractions as ``"a/b"`` with the sign on the numerator (``"3/-4"`` ->
    ``"-3/4"``) but not reduced, since an unreduced fraction is a different
    answer to "simplify".  A comma-separated list of numbers is normalised
    item by item (``"-2 ,3.0"`` -> ``"-2, 3"``).  Other text is only
    whitespace-collapsed and stripped.
    """
    text = " ".join(text.replace("\u2212", "-").split()).rstrip(".").strip()
    number = _normalize_number(text)
    if number is not None:
        return number
    if "," in text:
        items = [_normalize_number(item.strip()) for item in text.split(",")]
        if all(item is not None for item in items):
            return ", ".join(items)  # type: ignore[arg-type]
    return text


_ANSWER_MARKER = re.compile(r"####|answer is|answer:", re.IGNORECASE)


def final_answer(text: str) -> str:
    """The final answer of a response: the first line after the last answer marker
    (``####``, ``answer is``, ``answer:``, any case), else the last non-empty line."""
    parts = _ANSWER_MARKER.split(text)
    if len(parts) > 1:
        lines = [line for line in parts[-1].splitlines() if line.strip()]
        return lines[0].strip() if lines else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def answer_correct(prediction: str, reference: str) -> bool:
    """Whether the final answers agree after the math task's normalisation."""
    return normalize_answer(final_answer(prediction)) == normalize_answer(final_answer(reference))
