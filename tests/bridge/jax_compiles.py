"""Count JAX's compilations inside a `with` block, from its `log_compiles` messages."""

import contextlib
import logging

import jax

# what JAX logs per program: "Compiling NAME ..." when it lowers one, "Finished XLA compilation
# of NAME in ..." when XLA compiles it (a lowering may be served from a cache of executables)
_MESSAGES = {"lower": ("Compiling ", 1), "xla": ("Finished XLA compilation of ", 4)}


class _Names(logging.Handler):
    def __init__(self, prefix: str, field: int):
        super().__init__(logging.DEBUG)
        self.prefix, self.field, self.names = prefix, field, []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(self.prefix):
            self.names.append(message.split(" ")[self.field])


@contextlib.contextmanager
def compilations(stage: str = "lower"):
    """Yields the list of program names JAX lowers (`stage='lower'`) or XLA compiles
    (`stage='xla'`) inside the block."""
    handler, logger = _Names(*_MESSAGES[stage]), logging.getLogger("jax")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield handler.names
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
