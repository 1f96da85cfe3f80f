"""Teachers of every openness: local model (full logits), top-k cache, OpenAI-compatible server, mixture."""

from lmdistill.teachers.base import Capability, CapabilityError, Needs, Teacher, check_needs, require
from lmdistill.teachers.local import LocalTeacher, TokenizerMismatch, check_tokenizers

__all__ = ["Capability", "CapabilityError", "LocalTeacher", "Needs", "Teacher", "TokenizerMismatch", "check_needs",
           "check_tokenizers", "require"]
