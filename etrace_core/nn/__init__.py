"""Layers built on the ETP ops: every weight is a ``ParamState`` used through
``etrace_core.ops``."""

from . import init, surrogate
from .activations import get_activation
from .base import RecurrentModule
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .gated import CFNCell, LRUCell, MGUCell, MiniGRU, MiniLSTM, MinimalRNNCell, URLSTMCell
from .grouped import GroupedLinear
from .lif import LIF
from .linear import Linear
from .linear_variants import LoRA, ScaledWSLinear, SignedWLinear
from .readout import LeakyRateReadout
from .rnn import GRUCell, LeakyRNNCell, LSTMCell, ValinaRNNCell, VanillaRNNCell
from .sparse import SparseLinear
from .surrogate import sigmoid_surrogate, spike_fn

__all__ = [
    "init",
    "surrogate",
    "get_activation",
    "RecurrentModule",
    "Linear",
    "SignedWLinear",
    "ScaledWSLinear",
    "LoRA",
    "SparseLinear",
    "GroupedLinear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "VanillaRNNCell",
    "ValinaRNNCell",
    "GRUCell",
    "LSTMCell",
    "LeakyRNNCell",
    "MGUCell",
    "MinimalRNNCell",
    "MiniGRU",
    "MiniLSTM",
    "CFNCell",
    "URLSTMCell",
    "LRUCell",
    "LIF",
    "LeakyRateReadout",
    "spike_fn",
    "sigmoid_surrogate",
]
