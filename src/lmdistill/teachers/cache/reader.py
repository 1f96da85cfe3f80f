""":class:`CachedTeacher`: a ``TOPK`` teacher read back from a top-k cache (:mod:`.format`), no model in memory.

A reader shifts each position's k log-probs by one constant so that their mass is exactly
``1 − exp(log_tail)``: float16 or uint8 rounding then moves probability only among the k ids, never
into or out of the tail bucket the losses build (:func:`lmdistill.losses.log_distributions`). With
``cache_dtype=uint8`` that constant is also the best log-prob, which is not stored.

Reads version-2 caches and the version-1 caches written before them (:mod:`.format`).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from lmdistill.losses import TopK
from lmdistill.losses._common import log1mexp
from lmdistill.teachers.base import Capability, CapabilityError, Teacher
from lmdistill.teachers.cache.format import (
    HOW_TO_BUILD,
    INDEX,
    CacheError,
    CacheMiss,
    decode_ids,
    dequantise_logprobs,
    read_index,
    row_key,
    tokenizer_fingerprint,
    unpack_ids,
)
from lmdistill.teachers.local import TokenizerMismatch

log = logging.getLogger(__name__)


class CachedTeacher(Teacher):
    """A ``TOPK`` teacher read from a cache directory: no model in memory, shards opened lazily.

    Shards are memory-mapped (safetensors ``safe_open``) when first needed and kept in an LRU of
    ``max_open_shards``; only the rows asked for are read. Only the cached positions (the rows'
    responses) carry the teacher; every other position gets a filler (ids 0..k−1, each log(1/V))
    that the losses mask. No teacher forward runs here (``modules()`` is empty); what building the
    cache cost is in its index (``teacher_params``).

    `tokenizer`, when given, is checked to be the one the cache was built with, and is then the
    teacher's ``tokenizer``.
    """

    capability = Capability.TOPK

    def __init__(self, directory: str | Path, *, tokenizer: PreTrainedTokenizerBase | None = None,
                 max_open_shards: int = 8) -> None:
        self.directory = Path(directory)
        index = read_index(self.directory)
        self.index = index
        self.k: int = index["k"]
        self.tail_samples: int = index.get("tail_samples", 0)
        self.vocab_size: int = index["vocab_size"]
        self.encoding: str = index["ids"]
        self.version: int = index["version"]
        self.dtype: str = index["dtype"]
        self.logprob_step: float | None = index.get("logprob_step")
        self.name = f"cache:{self.directory}"
        self.complete: bool = index["complete"]
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
            self.tokenizer = tokenizer
        if not self.complete:
            log.warning("the top-k cache %s is incomplete (%d of %d shards); rerun `lmdistill cache-teacher` to finish it",
                        self.directory, len(index["shards"]), index["planned_shards"])
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, object] = OrderedDict()
        self._files = [self.directory / s["file"] for s in index["shards"]]
        self._rows: dict[bytes, tuple[int, int]] = {}
        self._starts: list[list[int]] = []
        self._offsets: list[list[int]] = []
        self._id_offsets: list[list[int]] = []
        for si, path in enumerate(self._files):
            if not path.is_file():
                raise CacheError(f"{path} is listed in {self.directory / INDEX} but missing; rerun "
                                 "`lmdistill cache-teacher` to recompute it")
            with safe_open(str(path), framework="pt") as f:
                keys = f.get_tensor("row_hash").numpy()
                self._starts.append(f.get_tensor("row_start").tolist())
                self._offsets.append(f.get_tensor("row_offset").tolist())
                if self.version >= 2:
                    self._id_offsets.append(f.get_tensor("row_id_offset").tolist())
            for r in range(keys.shape[0]):
                self._rows[keys[r].tobytes()] = (si, r)

    def __repr__(self) -> str:
        return (f"CachedTeacher({str(self.directory)!r}, k={self.k}, tail_samples={self.tail_samples}, "
                f"rows={len(self._rows)}, vocab={self.vocab_size})")

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
                f"{HOW_TO_BUILD}. Rows of other data, another data.max_length / data.system_prompt, or sequences "
                f"sampled during training (gkd with lam > 0, feedback-kl) are not cached.{more}")
        si, r = where
        a, b = self._offsets[si][r], self._offsets[si][r + 1]
        f = self._shard(si)
        ids, tail_ids = self._ids(f, si, r, a, b)  # (n, K), (n, tail_samples) or None
        if self.dtype == "uint8":
            lps = dequantise_logprobs(f.get_slice("logprob_gaps")[a:b], self.logprob_step)  # (n, K), up to a shift
        else:
            lps = f.get_slice("logprobs")[a:b].float()  # (n, K)
        head = log1mexp(f.get_slice("log_tail")[a:b].float())  # (n,) log of the top-K's exact mass
        shift = torch.where(torch.isfinite(head), head - lps.logsumexp(-1), 0.0)
        lps = lps + shift.unsqueeze(-1)
        target = f.get_slice("target_logprob")[a:b].float()
        top = TopK(ids=ids[:, :k].contiguous(), logprobs=lps[:, :k].contiguous())
        if self.tail_samples:
            top = top._replace(tail_ids=tail_ids, tail_plogp=f.get_slice("tail_plogp")[a:b].float())
        return self._starts[si][r], top, target

    def _ids(self, f, si: int, r: int, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row r of shard si (positions a..b): its top-K ids (n, K) and tail samples (n, tail_samples) or None."""
        n = self.tail_samples
        if self.version >= 2:
            stream = f.get_slice("id_bytes")[self._id_offsets[si][r] : self._id_offsets[si][r + 1]]
            try:
                ids, tail = unpack_ids(stream, b - a, self.k, n)
            except ValueError as e:
                raise CacheError(f"{self._files[si]} is damaged ({e}); delete it and rerun `lmdistill cache-teacher` "
                                 "to recompute it") from None
            return ids, tail if n else None
        parts = {"ids": f.get_slice("ids")[a:b]}
        if self.encoding.startswith("uint16+"):
            parts["ids_hi"] = f.get_slice("ids_hi")[a:b]
        ids = decode_ids(parts, self.k, self.encoding)
        if not n:
            return ids, None
        tail = {"tail_ids": f.get_slice("tail_ids")[a:b]}
        if self.encoding.startswith("uint16+"):
            tail["tail_ids_hi"] = f.get_slice("tail_ids_hi")[a:b]
        return ids, decode_ids(tail, n, self.encoding, "tail_ids")

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.k:
            raise ValueError(f"the top-k cache {self.directory} holds k={self.k} log-probs per position; asked for "
                             f"k={k} (set teacher.k to a value from 1 to {self.k})")
        if self.tail_samples and k != self.k:
            raise ValueError(f"the top-k cache {self.directory} holds tail samples drawn outside its top {self.k}; "
                             f"they are only valid with all {self.k} (asked for k={k}): set teacher.k={self.k}")

    def _rows_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, list[int]]]:
        """(b, positions of row b's tokens, its token ids) for every row of a (B, T) batch, any padding side."""
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask must both be (B, T)")
        for b in range(input_ids.shape[0]):
            where = attention_mask[b].nonzero().flatten()
            yield b, where, input_ids[b, where].tolist()

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, window: slice | None = None) -> TopK:
        """TopK ids and log-probs (B, W, k) at the rows' cached positions within `window` (None: all); filler
        elsewhere (masked by the loss).

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
        if window is not None:
            out = out.select((slice(None), window))
        return TopK(*(x.to(input_ids.device) if x is not None else None for x in out))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log-prob of each token given its prefix at the cached (response) tokens; the first token
        of a row and padding are 0, other (prompt) tokens NaN: the cache does not hold them."""
        out = torch.zeros(input_ids.shape, dtype=torch.float32)  # (B, T)
        for b, where, row in self._rows_of(input_ids.cpu(), attention_mask.cpu()):
            start, _, target = self.lookup(row)  # all K: a cache with tail samples refuses a smaller k
            out[b, where[1:]] = math.nan
            out[b, where[start + 1 : start + 1 + target.shape[0]]] = target
        return out.to(input_ids.device)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, window: slice | None = None) -> torch.Tensor:
        raise CapabilityError(f"a top-k cache gives top-{self.k} log-probs, not full logits ({self.directory}); "
                              "use teacher.kind=local for methods that need them")

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None,
                 seed: int | None = None) -> list[str]:
        raise CapabilityError(f"a top-k cache cannot generate ({self.directory}); use teacher.kind=local or server")
