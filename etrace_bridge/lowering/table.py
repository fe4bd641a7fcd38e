"""The op table: every supported ATen overload and its `OpRecord`, assembled from the families.

This table is the single answer to "what does the bridge lower?": the interpreter consults
nothing else, and tests walk every entry.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from . import complex, creation, elementwise, linalg, plumbing, pooling, reductions, rnn, shapes
from .record import OpRecord

FAMILIES = {
    "elementwise": elementwise.OPS,
    "reductions": reductions.OPS,
    "shapes": shapes.OPS,
    "creation": creation.OPS,
    "linalg": linalg.OPS,
    "pooling": pooling.OPS,
    "rnn": rnn.OPS,
    "plumbing": plumbing.OPS,
    "complex": complex.OPS,
}


def _build() -> Mapping[Any, OpRecord]:
    table: dict = {}
    for family, ops in FAMILIES.items():
        for target, record in ops.items():
            if target in table:
                raise RuntimeError(f"op {target} is listed twice (family {family})")
            table[target] = record
    return types.MappingProxyType(table)


OP_TABLE: Mapping[Any, OpRecord] = _build()
