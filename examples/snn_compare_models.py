"""Stock snntorch and spikingjelly networks for `etrace-compare --model FILE:FACTORY`.

    etrace-compare --model examples/snn_compare_models.py:snntorch_classifier --task digits
    etrace-compare --model examples/snn_compare_models.py:spikingjelly_classifier --task dms

Each factory builds the library's own layers as its tutorials do (snntorch `Leaky` with
`init_hidden=True`, spikingjelly `LIFNode` with `surrogate.ATan()` and `detach_reset=True`),
with a memoryless `Linear` readout of the spikes as the class logits. The state lives where the
library keeps it (snntorch attributes, spikingjelly memories); `reset_state(batch)` calls the
library's own reset, which is what `etrace-compare` uses between sequences.
Needs the libraries (`pip install --no-deps` the `snn` extra of pyproject.toml).
"""

from __future__ import annotations

from torch import nn

HIDDEN = 64


class SpikingClassifier(nn.Module):
    """`body` (a library's spiking layers) followed by a linear readout of its spikes."""

    def __init__(self, body: nn.Module, readout: nn.Module, reset):
        super().__init__()
        self.body, self.readout, self._reset = body, readout, reset

    def forward(self, x):
        return self.readout(self.body(x))

    def reset_state(self, batch_size: int) -> None:
        self._reset(self.body)


def snntorch_classifier(n_in: int, n_out: int) -> nn.Module:
    import snntorch as snn
    from snntorch import utils

    body = nn.Sequential(nn.Linear(n_in, HIDDEN), snn.Leaky(beta=0.9, init_hidden=True))
    return SpikingClassifier(body, nn.Linear(HIDDEN, n_out), utils.reset)


def spikingjelly_classifier(n_in: int, n_out: int) -> nn.Module:
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    body = nn.Sequential(
        layer.Linear(n_in, HIDDEN),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True),
    )
    return SpikingClassifier(body, nn.Linear(HIDDEN, n_out), functional.reset_net)
