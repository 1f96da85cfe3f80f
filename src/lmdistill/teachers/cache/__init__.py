"""A top-k teacher cache: the teacher run once over a dataset, read back during training without it.

``lmdistill cache-teacher CONFIG`` (:func:`lmdistill.cache_teacher.build_cache`) stores, at every
position whose next token is trained on, the teacher's top-k next-token ids and log-probs, the log
of the mass outside them (the tail) and the log-prob of the actual next token. Here:

- :mod:`.format`: row keys, id encodings, shard names, settings and the index (the layout of a
  cache directory is documented there);
- :mod:`.reader`: :class:`CachedTeacher` (``teacher.kind=cache``), which serves them as a ``TOPK`` teacher.
"""

from lmdistill.teachers.cache.format import (
    DEFAULT_K,
    HOW_TO_BUILD,
    CacheError,
    CacheMiss,
    decode_ids,
    encode_ids,
    id_encoding,
    row_key,
    tokenizer_fingerprint,
)
from lmdistill.teachers.cache.reader import CachedTeacher

__all__ = ["DEFAULT_K", "HOW_TO_BUILD", "CacheError", "CacheMiss", "CachedTeacher", "decode_ids", "encode_ids", "id_encoding",
           "row_key", "tokenizer_fingerprint"]
