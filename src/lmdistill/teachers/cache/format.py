"""The top-k cache's format: row keys, id encodings, shard names, settings and the index.

Rows are keyed by a content hash of their token ids (blake2b-128 of the ids as little-endian
int32), so a lookup does not depend on batch order, shuffling, padding side or which process asks.

Layout of a cache directory (``teacher.cache``)::

    index.json                          settings, the finished shards, totals (rewritten atomically
                                        after every shard)
    shard-00000-<digest>.safetensors    rows in data order until ``teacher.cache_shard_tokens``
                                        positions; <digest> hashes the shard's row keys

Tensors of a version-2 shard of R rows and N cached positions (``k`` = ``teacher.k``, 64 when 0;
``n`` = ``teacher.tail_samples``)::

    row_hash        (R, 16) uint8    the rows' keys
    row_start       (R,) int32       first cached position of the row (its prompt length − 1)
    row_offset      (R+1,) int32     row r's positions are [row_offset[r], row_offset[r+1]) below
    row_id_offset   (R+1,) int32     row r's ids are id_bytes[row_id_offset[r] : row_id_offset[r+1]]
                                     (both offsets int64 where a shard outgrows int32)
    id_bytes        (B,) uint8       per position, LEB128 varints (7 bits a byte, high bit: more
                                     follow): its k top-k ids best first, then its n tail samples
                                     sorted ascending, each as its gap to the one before (the
                                     first as itself); any vocabulary size
    logprobs        (N, k) float16 | float32    ``teacher.cache_dtype`` float16 / float32, or
    logprob_gaps    (N, k−1) uint8   ``cache_dtype=uint8``: round((lp_0 − lp_i) / step), i = 1..k−1,
                                     step = ``logprob_step`` of the index (1/16 nat), clamped at 255
                                     (gaps past 15.9 nats); lp_0 itself is not stored: the reader
                                     adds the constant that gives the k their exact mass (below)
    log_tail        (N,)             log of 1 − Σ top-k probabilities, computed exactly (not from
                                     the rounded top-k)
    target_logprob  (N,)             log-prob of the token that follows (for ``score``)
    tail_plogp      (N,) float32     only with n > 0: Σ_tail q·log q, exact (float16 with uint8)

The tail samples are n systematic samples from the teacher's tail
(:func:`lmdistill.losses.sample_tail`); the losses only use their mean, so their order is free.
log_tail and target_logprob are float32 with ``cache_dtype=float32``, else float16.

Version 1 (read, no longer written) stored ids as fixed-width integers instead of ``id_bytes``::

    row_offset      (R+1,) int64
    ids             (N, k) uint16    top-k ids, best first: the low 16 bits; int32 when V > 2^24
    ids_hi          (N, ⌈k·b/8⌉) uint8  only when 2^16 < V ≤ 2^24: the high b ∈ {2, 4, 8} bits, packed
    tail_ids        (N, n) uint16 (+ tail_ids_hi)  in the sampler's order

Sizes with SmolLM2 (V = 49,152) on math rows, bytes per cached token (``scripts/measure_teacher_cache.py``;
28 bytes per row are ~5 of them there, the responses being short): k = 32 + 64 samples took 269.7 in
version 1 and takes 232.3 in float16, 197.3 in uint8; k = 8 + 64 samples in uint8 116.3 (top-8 ids 11,
gaps 7, samples 86, scalars 6). A varint id takes 1 byte below 128, 2 below 16,384, 3 below 2^21: ~1.4
bytes per top-k id, ~1.35 per sorted sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from lmdistill.io import UserError, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "lmdistill-topk-cache"
VERSION = 2
"""The version written; :data:`READ_VERSIONS` are read."""
READ_VERSIONS = (1, 2)
INDEX = "index.json"
DEFAULT_K = 64
"""k of a cache built with ``teacher.k=0``: the k that ``methods.common.teacher_signal`` asks a top-k
teacher for when ``teacher.k`` is 0, so a cache built and read with the same config agrees."""
DTYPES = {"float16": torch.float16, "float32": torch.float32, "uint8": torch.float16}
"""``teacher.cache_dtype`` → the dtype of the per-position scalars (and of float log-probs)."""
LOGPROB_STEP = 1 / 16
"""Step of ``cache_dtype=uint8``: each log-prob is stored as its gap to the position's best in these
steps (error ≤ step/2 before the reader's shift), 255 steps at most. Measured on SmolLM2: finer steps
(1/32, 1/64: clamped at 8 or 4 nats) err by 2e-3 to 0.8 in fkl through the clamped ids; 1/16 adds
~5e-5 to float16's error."""
VARINT_BYTES = 5
"""Most bytes of one varint: 35 bits, more than any vocabulary."""
HOW_TO_BUILD = "build it with `lmdistill cache-teacher CONFIG` (the run's config, same data and student tokenizer)"
OPTIONAL_SETTINGS = ("tail_samples", "prefix_sha256", "logprob_step")
"""Settings written only when their option is used (so older caches still match)."""


class CacheError(UserError, ValueError):
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


def encode_varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M,) non-negative integers → (LEB128 stream (B,) uint8, bytes of each value (M,) int64)."""
    v = np.asarray(values, dtype=np.int64)
    if v.size and (v.min() < 0 or v.max() >= 1 << 7 * VARINT_BYTES):
        raise ValueError(f"varints hold integers in [0, 2^{7 * VARINT_BYTES}), got {v.min()}..{v.max()}")
    nbytes = np.ones(v.shape, dtype=np.int64)
    for j in range(1, VARINT_BYTES):
        nbytes += v >= 1 << 7 * j
    groups = np.stack([(v >> 7 * j) & 0x7F for j in range(VARINT_BYTES)], axis=-1).astype(np.uint8)  # (M, 5)
    j = np.arange(VARINT_BYTES)
    groups |= ((j < nbytes[:, None] - 1) << 7).astype(np.uint8)  # continuation bit on all but the last
    return groups[j < nbytes[:, None]], nbytes


def decode_varints(stream: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_varints`: a LEB128 stream (B,) uint8 → its values (M,) int64."""
    stream = np.asarray(stream, dtype=np.uint8)
    if stream.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = (stream & 0x80) == 0  # (B,) the last byte of each value
    if not last[-1]:
        raise ValueError("the varint stream ends inside a value")
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))  # (M,) first byte of each value
    within = np.arange(stream.size) - np.repeat(starts, np.diff(np.append(starts, stream.size)))
    if within.max() >= VARINT_BYTES:
        raise ValueError(f"a varint longer than {VARINT_BYTES} bytes")
    return np.add.reduceat((stream & 0x7F).astype(np.int64) << (7 * within), starts)


def pack_ids(top_ids: torch.Tensor, tail_ids: torch.Tensor | None, row_offset: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard's ids → (id_bytes (B,) uint8, row_id_offset (R+1,)), the version-2 layout (module docstring).

    top_ids: (N, k) best first; tail_ids: (N, n) or None; row_offset: (R+1,) positions of each row.
    """
    values = top_ids.to(torch.int64).numpy()
    if tail_ids is not None and tail_ids.shape[1]:
        tail = np.sort(tail_ids.to(torch.int64).numpy(), axis=1)
        values = np.concatenate([values, np.diff(tail, axis=1, prepend=0)], axis=1)  # (N, k+n)
    stream, nbytes = encode_varints(values.reshape(-1))
    per_position = np.concatenate(([0], nbytes.reshape(values.shape).sum(1).cumsum()))  # (N+1,)
    return torch.from_numpy(stream), offsets_tensor(torch.from_numpy(per_position[row_offset.numpy()]))


def unpack_ids(id_bytes: torch.Tensor, positions: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_ids` for one row's bytes: (top ids (positions, k), tail ids (positions, n)), int64."""
    values = decode_varints(id_bytes.numpy())
    if values.size != positions * (k + n):
        raise ValueError(f"{values.size} ids where {positions} positions of {k} + {n} were expected")
    values = torch.from_numpy(values).view(positions, k + n)
    return values[:, :k], values[:, k:].cumsum(1)


def quantise_logprobs(logprobs: torch.Tensor, step: float = LOGPROB_STEP) -> torch.Tensor:
    """(N, k) log-probs, best first → (N, k−1) uint8: each one's gap to the best in `step`s, rounded, ≤ 255."""
    gaps = (logprobs[:, :1].float() - logprobs[:, 1:].float()) / step
    return torch.nan_to_num(gaps, nan=255.0, posinf=255.0).round().clamp(0, 255).to(torch.uint8)


def dequantise_logprobs(codes: torch.Tensor, step: float) -> torch.Tensor:
    """Inverse of :func:`quantise_logprobs` up to a constant: (N, k) float32, the best at 0, non-increasing."""
    return torch.nn.functional.pad(-codes.float() * step, (1, 0))


def offsets_tensor(offsets: torch.Tensor) -> torch.Tensor:
    """Offsets (R+1,) as int32, or int64 where they do not fit."""
    return offsets.to(torch.int32 if int(offsets[-1]) < 1 << 31 else torch.int64)


def encode_shard(tensors: dict[str, torch.Tensor], cache_dtype: str) -> dict[str, torch.Tensor]:
    """A shard's values (full-precision: int64 ids (N, k), float32 log-probs, ...) → its stored tensors.

    In: row_hash, row_start, row_offset (R+1,), ids, logprobs, log_tail, target_logprob, and with
    tail samples tail_ids (N, n) and tail_plogp. Out: the version-2 tensors (module docstring).
    """
    out = {"row_hash": tensors["row_hash"], "row_start": tensors["row_start"].to(torch.int32),
           "row_offset": offsets_tensor(tensors["row_offset"])}
    out["id_bytes"], out["row_id_offset"] = pack_ids(tensors["ids"], tensors.get("tail_ids"), tensors["row_offset"])
    if cache_dtype == "uint8":
        out["logprob_gaps"] = quantise_logprobs(tensors["logprobs"])
    else:
        out["logprobs"] = tensors["logprobs"].to(DTYPES[cache_dtype])
    for name in ("log_tail", "target_logprob"):
        out[name] = tensors[name].to(DTYPES[cache_dtype])
    if "tail_plogp" in tensors:
        out["tail_plogp"] = tensors["tail_plogp"].to(torch.float16 if cache_dtype == "uint8" else torch.float32)
    return out


# --------------------------------------------------------------------------- shards


def shard_digest(keys: Sequence[bytes]) -> str:
    """12 hex digits hashing a shard's row keys: in its file name, and the seed of its tail samples."""
    return hashlib.blake2b(b"".join(keys), digest_size=6).hexdigest()


def shard_name(i: int, keys: Sequence[bytes]) -> str:
    """File name of shard `i` holding the rows of `keys`."""
    return f"shard-{i:05d}-{shard_digest(keys)}.safetensors"


def shard_holds(path: Path, keys: Sequence[bytes]) -> bool:
    """Whether `path` is a readable shard holding exactly the rows of `keys` (a damaged file: False)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.get_tensor("row_hash")
    except Exception:  # noqa: BLE001 - any unreadable file counts as not there
        log.warning("%s is unreadable; recomputing it", path)
        return False
    return stored.numpy().tobytes() == b"".join(keys)


# --------------------------------------------------------------------------- settings and index


def read_index(directory: Path) -> dict:
    """The index of the cache in `directory`, checked to be of this format and version."""
    path = directory / INDEX
    if not path.is_file():
        raise CacheError(f"no top-k cache at {directory} ({INDEX} is missing): {HOW_TO_BUILD}")
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise CacheError(f"{path}: not valid JSON ({e}); delete the directory and rebuild it: {HOW_TO_BUILD}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") not in READ_VERSIONS:
        version = index.get("version") if isinstance(index, dict) else None
        raise CacheError(f"{path} is not a {FORMAT} index of version {' or '.join(map(str, READ_VERSIONS))} "
                         f"(version {version!r}); delete the directory and rebuild it: {HOW_TO_BUILD}")
    return index


def check_settings(directory: Path, settings: dict) -> None:
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


def write_index(directory: Path, settings: dict, shards: list[tuple[str, int, int] | None],
                teacher_params: int | None) -> dict:
    """Rewrite index.json (atomically): `settings`, then the finished shards and the totals.

    shards: per planned shard, (file name, rows, cached positions) once finished, else None.
    teacher_params: parameters of the teacher that built it (None: keep the value already there).
    """
    old = json.loads((directory / INDEX).read_text()) if (directory / INDEX).is_file() else {}
    finished = [{"file": name, "rows": rows, "tokens": tokens, "bytes": (directory / name).stat().st_size}
                for name, rows, tokens in (s for s in shards if s is not None)]
    tokens = sum(s["tokens"] for s in finished)
    size = sum(s["bytes"] for s in finished)
    index = {
        **settings,
        "teacher_params": teacher_params if teacher_params is not None else old.get("teacher_params"),
        "complete": all(s is not None for s in shards),
        "planned_shards": len(shards),
        "rows": sum(s["rows"] for s in finished),
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": round(size / tokens, 2) if tokens else 0.0,
        "shards": finished,
    }
    atomic_write_json(directory / INDEX, index)
    return index
