"""Teachers of every openness: local model (full logits), top-k cache, OpenAI-compatible server."""

from lmdistill.teachers.base import Capability, CapabilityError, Teacher, require
from lmdistill.teachers.local import LocalTeacher, TokenizerMismatch, check_tokenizers

__all__ = ["Capability", "CapabilityError", "LocalTeacher", "Teacher", "TokenizerMismatch", "check_tokenizers", "require"]
