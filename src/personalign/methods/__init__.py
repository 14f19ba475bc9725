"""Decoding methods. Each built-in registers itself on import; this list is the whole set."""

from personalign.decoding.method import METHODS, DecodeState, Method, TokenMethod, get_method, method_names
from personalign.methods import (  # noqa: F401  (registration, one module per method)
    amulet,
    args,
    base,
    best_of_n,
    drift,
    linear_alignment,
    pad,
    pdpo,
    persona_judge,
    preference_prompting,
)

__all__ = ["METHODS", "DecodeState", "Method", "TokenMethod", "get_method", "method_names"]
