"""The top-k cache's format: row keys, id encodings, shard names, settings and the index.

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

At k = 64 with V ≤ 65,536 and float16 that is 4·64 + 4 = 260 bytes per position, plus 28 bytes
per row and each shard's header (measured: 265.6 bytes per token with SmolLM2 on math rows).
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
VERSION = 1
INDEX = "index.json"
DEFAULT_K = 64
"""k of a cache built with ``teacher.k=0``: the k that ``methods.common.teacher_signal`` asks a top-k
teacher for when ``teacher.k`` is 0, so a cache built and read with the same config agrees."""
DTYPES = {"float16": torch.float16, "float32": torch.float32}
HOW_TO_BUILD = "build it with `lmdistill cache-teacher CONFIG` (the run's config, same data and student tokenizer)"
OPTIONAL_SETTINGS = ("tail_samples", "prefix_sha256")
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
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise CacheError(f"{path} is not a version-{VERSION} {FORMAT} index; rebuild it: {HOW_TO_BUILD}")
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
