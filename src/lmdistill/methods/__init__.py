"""Training methods, registered by name (`method.name=...`)."""

from lmdistill.methods import sft  # noqa: F401  (registers)
from lmdistill.methods.base import METHODS, FlopCounter, Method, RunContext, make_method, register

__all__ = ["METHODS", "FlopCounter", "Method", "RunContext", "make_method", "register"]
