"""Exceptions raised by the torch -> JAX bridge.

Every refusal names what was found (module attribute, class, ATen op, source line) and says how
to fix it, so a PyTorch user can act on the message without reading bridge internals.
"""


class BridgeError(Exception):
    """Base class of the bridge's own errors."""


class ExportError(BridgeError):
    """`torch.export` could not capture one step of the model, or the model was refused."""


class UnsupportedModelError(ExportError):
    """The model exports, but its one-step graph would be wrong for online learning."""


class UnsupportedOpError(BridgeError, NotImplementedError):
    """An ATen op in the exported graph has no JAX lowering."""


class ConversionCheckError(BridgeError):
    """The converted step does not reproduce the torch model when both are run step by step."""


class StaleConversionError(BridgeError):
    """The torch model changed in a way the converted step cannot follow: re-convert it."""


class CheckpointError(BridgeError, ValueError):
    """A checkpoint that does not fit this learner (nothing was changed)."""


class TargetError(BridgeError, ValueError):
    """A target the named loss cannot use (wrong shape, dtype or class)."""
