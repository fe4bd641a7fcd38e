"""The online algorithms by name: the one list every part of the bridge and the app reads.

Names map to `etrace_core` classes by attribute name, so this module imports nothing heavy
(the command line reads it for `--help`). Aliases name the same algorithm and are labelled so.
"""

from __future__ import annotations

import importlib

__all__ = ["ALGORITHMS", "ALIASES", "ALGORITHM_NAMES", "canonical_name", "make_algorithm"]

# name -> etrace_core class
ALGORITHMS = {
    "d_rtrl": "ParamDimVjpAlgorithm",
    "es_d_rtrl": "IODimVjpAlgorithm",
    "hybrid": "HybridDimVjpAlgorithm",
}
# alias -> name (pp_prop is the published name of ES-D-RTRL)
ALIASES = {"pp_prop": "es_d_rtrl"}
ALGORITHM_NAMES = tuple(ALGORITHMS)


def canonical_name(name: str) -> str:
    """'ES-D-RTRL', 'es_d_rtrl' and the alias 'pp_prop' all give 'es_d_rtrl'."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in ALGORITHMS:
        choices = sorted([*ALGORITHMS, *ALIASES])
        raise ValueError(f"unknown algorithm {name!r}; choose one of {choices}")
    return key


def make_algorithm(name: str, model, **options):
    """The online algorithm called `name` wrapped around `model` (an etrace_core algorithm)."""
    cls = getattr(importlib.import_module("etrace_core"), ALGORITHMS[canonical_name(name)])
    return cls(model, **options)
