"""Errors raised by the eligibility-trace compiler."""


class CompilationError(ValueError):
    """The model's one-step program cannot be compiled into an eligibility-trace graph."""


class NotCompiledError(ValueError):
    """A graph was asked for before `compile_graph` was called."""


class NotSupportedError(NotImplementedError):
    """A model feature or option that etrace does not support (braintrace's name)."""
