"""Training methods, registered by name (`method.name=...`)."""

from lmdistill.methods import distill, distillm, hidden, minillm, preference, sequence, sft  # noqa: F401  (registers)
from lmdistill.methods.base import METHODS, FlopCounter, Method, RunContext, make_method, method_rows, register

__all__ = ["METHODS", "FlopCounter", "Method", "RunContext", "make_method", "method_rows", "register"]
