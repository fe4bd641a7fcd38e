"""Where a torch module keeps state between calls, and which of those places are hidden state.

A *slot* is one place a step can write: a registered buffer, a plain tensor attribute (snntorch
`reset`, sinabs `firing_rate`), or a spikingjelly memory (`register_memory`, kept in
`_memories`). `discover_slots` runs one eager warm-up step on copies and returns the slots the
step writes, each with the value the next step starts from:

- the user's value, when it already has the size the step gives it;
- zeros of the step's size for a lazily sized `zeros(0)`/None value (snntorch, sinabs), the
  float broadcast to that size for a float memory (spikingjelly's `v = 0.0`).

Whether a written slot is *hidden state* is decided on the exported graph: only a slot whose
incoming value the step reads is state (`reset`, written then read within a step, and
`firing_rate`, written and never read, are not). The user's tensors, attributes and RNG are left
as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["Slot", "SlotState", "discover_slots", "swapped_slots", "all_slots", "ABSENT"]

ABSENT = object()  # `Slot.get` default / `Slot.set` value: the slot does not exist


class Slot(NamedTuple):
    """One place of state: `kind` is 'buffer', 'attribute' or 'memory'."""

    owner: str
    kind: str
    attr: str

    @property
    def name(self) -> str:
        return f"{self.owner}.{self.attr}" if self.owner else self.attr

    def get(self, root: torch.nn.Module, default=ABSENT):
        sub = root.get_submodule(self.owner)
        if self.kind == "buffer":
            return sub._buffers.get(self.attr, default)
        if self.kind == "memory":
            return sub.__dict__["_memories"].get(self.attr, default)
        return sub.__dict__.get(self.attr, default)

    def set(self, root: torch.nn.Module, value) -> None:
        sub = root.get_submodule(self.owner)
        where = (
            sub._buffers
            if self.kind == "buffer"
            else sub.__dict__["_memories"]
            if self.kind == "memory"
            else sub.__dict__
        )
        if value is ABSENT:
            where.pop(self.attr, None)
        else:
            where[self.attr] = value

    def describe(self) -> str:
        what = {
            "buffer": "buffer",
            "attribute": "tensor attribute",
            "memory": "memory (register_memory)",
        }[self.kind]
        return f"`{self.name}` ({what})"


@dataclasses.dataclass(frozen=True)
class SlotState:
    """A slot the step writes: its start value for the converted step, and how it was found.

    `new`: the slot did not exist before the step (an attribute the step creates);
    `sized`: its value was empty/None/a float and the warm-up step gave it a shape.
    """

    slot: Slot
    init: torch.Tensor
    new: bool
    sized: bool


def all_slots(root: torch.nn.Module) -> list[Slot]:
    """Every buffer, tensor attribute and spikingjelly memory of `root` and its submodules."""
    slots = []
    for owner, sub in root.named_modules():
        slots += [Slot(owner, "buffer", a) for a, b in sub._buffers.items() if b is not None]
        slots += [
            Slot(owner, "attribute", a) for a, v in vars(sub).items() if isinstance(v, torch.Tensor)
        ]
        memories = sub.__dict__.get("_memories")
        if isinstance(memories, dict):
            slots += [
                Slot(owner, "memory", a)
                for a, v in memories.items()
                if v is None or isinstance(v, (torch.Tensor, float, int))
            ]
    return slots


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def swapped_slots(
    root: torch.nn.Module, values: dict[Slot, Any] | None = None
) -> Iterator[list[Slot]]:
    """Run with private copies in every slot (or `values`), then put the user's objects back.

    Every attribute, buffer and memory entry of every submodule is restored to the object it
    was (attributes the block created are removed), so the user's module is as it was.
    """
    slots = all_slots(root)
    saved = [
        (
            sub,
            dict(sub.__dict__),
            dict(sub._buffers),
            dict(sub.__dict__["_memories"])
            if isinstance(sub.__dict__.get("_memories"), dict)
            else None,
        )
        for sub in root.modules()
    ]
    try:
        for s in slots:
            s.set(root, _copy(s.get(root)))
        for s, v in (values or {}).items():
            s.set(root, v)
        yield slots
    finally:
        for sub, attrs, buffers, memories in saved:
            if memories is not None:
                attrs["_memories"].clear()
                attrs["_memories"].update(memories)
            sub._buffers.clear()
            sub._buffers.update(buffers)
            sub.__dict__.clear()
            sub.__dict__.update(attrs)


def _snapshot(root, slots) -> dict:
    return {s: (s.get(root), getattr(s.get(root), "_version", None)) for s in slots}


def discover_slots(root: torch.nn.Module, run: Callable[[], Any]) -> list[SlotState]:
    """Slots written by one step `run()` of `root`, each with its start value (see module doc).

    `run` calls the module once on the example inputs; it runs on copies of all slots.
    """
    with torch.random.fork_rng(devices=[]), swapped_slots(root) as slots:
        before = _snapshot(root, slots)
        originals = {s: _copy(v) for s, (v, _) in before.items()}  # steps may write in place
        run()
        after_slots = all_slots(root)
        written = []
        for s in after_slots:
            now = s.get(root)
            if s not in before:
                written.append(SlotState(s, _copy(now), new=True, sized=False))
                continue
            old, version = before[s]
            if now is old and getattr(now, "_version", None) == version:
                continue
            if not isinstance(now, torch.Tensor):
                continue
            written.append(_start_value(s, originals[s], now))
    return written


def _start_value(slot: Slot, user_value, now: torch.Tensor) -> SlotState:
    if isinstance(user_value, torch.Tensor) and user_value.shape == now.shape:
        return SlotState(slot, user_value.detach().clone(), new=False, sized=False)
    if isinstance(user_value, (float, int)) and not isinstance(user_value, bool):
        return SlotState(slot, torch.full_like(now, float(user_value)), new=False, sized=True)
    # zeros(0), None, or another size: the library re-makes the state as zeros (snntorch,
    # sinabs); the self-check of the conversion confirms the start value.
    return SlotState(slot, torch.zeros_like(now), new=False, sized=True)


def slot_by_name(states: Sequence[SlotState], name: str) -> SlotState:
    return next(s for s in states if s.slot.name == name)
