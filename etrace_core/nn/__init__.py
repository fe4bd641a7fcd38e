"""Layers built on the ETP ops: every weight is a ``ParamState`` used through ``etrace_core.ops``."""
from . import init, surrogate
from .activations import get_activation
from .base import RecurrentModule
from .conv import Conv1d, Conv2d
from .lif import LIF
from .linear import Linear
from .readout import LeakyRateReadout
from .rnn import GRUCell, LSTMCell, LeakyRNNCell, ValinaRNNCell, VanillaRNNCell
from .surrogate import sigmoid_surrogate, spike_fn

__all__ = [
    'init', 'surrogate', 'get_activation', 'RecurrentModule',
    'Linear', 'Conv1d', 'Conv2d',
    'VanillaRNNCell', 'ValinaRNNCell', 'GRUCell', 'LSTMCell', 'LeakyRNNCell',
    'LIF', 'LeakyRateReadout',
    'spike_fn', 'sigmoid_surrogate',
]
