"""Compiled programs shared by models of the same structure within a process.

Each conversion builds its own Python function for the self-check's JAX side, so `jax.jit`'s
own cache (keyed by the function) never sees two conversions of the same structure as one
program. Here a program is keyed by what it computes: its StableHLO text with every constant
passed as an argument (so models that differ only in parameter or buffer values share it), and
the devices it runs on. Equal text is the same computation, so re-using the executable is safe;
a second `from_torch` of the same architecture skips that XLA compile.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import jax
from jax.extend import core as jcore

__all__ = ["call_jaxpr", "MAX_PROGRAMS"]

MAX_PROGRAMS = 64  # least recently used programs beyond this are dropped

_LOCK = threading.Lock()
_PROGRAMS: OrderedDict[tuple, jax.stages.Compiled] = OrderedDict()


def call_jaxpr(closed: jcore.ClosedJaxpr, *args) -> list:
    """Run `closed` on `args` (flat arrays) as one compiled program; returns its flat outputs."""
    jaxpr = closed.jaxpr
    consts = list(closed.consts)

    def program(consts, args):
        return jax.core.eval_jaxpr(jaxpr, consts, *args)

    lowered = jax.jit(program).lower(consts, list(args))
    key = (_digest(lowered.as_text()), _devices(consts, args))
    with _LOCK:
        compiled = _PROGRAMS.get(key)
        if compiled is not None:
            _PROGRAMS.move_to_end(key)
    if compiled is None:
        compiled = lowered.compile()
        with _LOCK:
            _PROGRAMS[key] = compiled
            while len(_PROGRAMS) > MAX_PROGRAMS:
                _PROGRAMS.popitem(last=False)
    return compiled(consts, list(args))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _devices(*trees) -> tuple:
    found = set()
    for x in jax.tree.leaves(trees):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            found.update((d.platform, d.id) for d in x.devices())
    return tuple(sorted(found))
