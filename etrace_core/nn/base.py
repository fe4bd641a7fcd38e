"""Hidden-state bookkeeping shared by the recurrent layers."""

from typing import Optional

import brainstate

from .init import resolve_dtype, state_zeros

__all__ = ["RecurrentModule"]


class RecurrentModule(brainstate.nn.Module):
    """A module whose hidden states (attributes named in ``state_names``) are zero-initialised.

    ``init_state(batch_size=None)`` creates one ``brainstate.HiddenState`` per name, of shape
    ``varshape`` or ``(batch_size,) + varshape`` (zeros, or ``state_init(shape)`` when the layer
    was given a ``state_init``); ``reset_state`` writes the same values into
    the existing states, so references held elsewhere (compiled graphs, optimisers) stay valid.
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, varshape, dtype=None, name: Optional[str] = None, state_init=None):
        super().__init__(name=name)
        self.varshape = tuple(varshape)
        self.dtype = resolve_dtype(dtype)
        self.state_init = state_init  # None: zeros; else any init(shape) (braintools' too)

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        for name in self.state_names:
            setattr(
                self,
                name,
                brainstate.HiddenState(
                    state_zeros(self.varshape, batch_size, self.dtype, self.state_init)
                ),
            )

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        for name in self.state_names:
            value = state_zeros(self.varshape, batch_size, self.dtype, self.state_init)
            state = getattr(self, name, None)
            if isinstance(state, brainstate.HiddenState):
                state.value = value
            else:
                setattr(self, name, brainstate.HiddenState(value))
