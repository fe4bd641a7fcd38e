"""Embedding table whose lookup is an ETP matmul of one-hot indices (exact, traceable)."""

from typing import Optional

import brainstate
import jax
import jax.numpy as jnp

from etrace_core import ops

from .init import DEFAULT, Initializer, Key, feature_size, make_param, normal, resolve_dtype

__all__ = ["Embedding"]


class Embedding(brainstate.nn.Module):
    """``y = weight[indices]`` with ``weight: (num_embeddings, embedding_size)`` (default
    N(0, 1), torch's), output ``indices.shape + (embedding_size,)``.

    The lookup is ``one_hot(indices) @ weight`` through :func:`etrace_core.ops.matmul`, so the
    table is an ETP weight with its exact gradient (memory O(num_embeddings) per looked-up
    index). braintrace's options ``padding_idx``, ``max_norm``, ``scale_grad_by_freq`` and
    ``freeze`` are refused (NotImplementedError), as braintrace does.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_size,
        embedding_init: Optional[Initializer] = DEFAULT,
        padding_idx=None,
        max_norm=None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        freeze: bool = False,
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(
                f"padding_idx must lie in [-{num_embeddings}, {num_embeddings}), got {padding_idx}"
            )
        self.padding_idx, self.max_norm = padding_idx, max_norm
        self.scale_grad_by_freq, self.freeze = scale_grad_by_freq, freeze
        self._refuse_unsupported()
        self.num_embeddings = int(num_embeddings)
        self.embedding_size = feature_size(embedding_size, "embedding_size")
        self.norm_type = norm_type
        self.weight = make_param(
            embedding_init,
            (self.num_embeddings, self.embedding_size),
            resolve_dtype(dtype),
            key,
            normal(1.0),
        )

    def _refuse_unsupported(self):
        """The options braintrace refuses too (checked again at every call: they are plain
        attributes that could be set after construction)."""
        unsupported = [
            f"{n}={v}"
            for n, v in (
                ("max_norm", self.max_norm),
                ("freeze", self.freeze),
                ("scale_grad_by_freq", self.scale_grad_by_freq),
                ("padding_idx", self.padding_idx),
            )
            if v is not None and v is not False
        ]
        if unsupported:
            raise NotImplementedError(
                f"Embedding does not support: {', '.join(unsupported)}. Leave them at their "
                "defaults (the lookup must stay an exact ETP op)"
            )

    @classmethod
    def from_pretrained(cls, embeddings, freeze: bool = True, **kwargs):
        """An Embedding holding `embeddings` (``(num, size)``). ``freeze=True`` (torch's and
        brainstate's default) is refused like the other unsupported options: pass
        ``freeze=False`` and leave the table out of the optimiser to keep it fixed."""
        embeddings = jnp.asarray(embeddings)
        if embeddings.ndim != 2:
            raise ValueError(
                f"embeddings must be 2-D (num_embeddings, embedding_size), "
                f"got shape {embeddings.shape}"
            )
        return cls(
            embeddings.shape[0],
            embeddings.shape[1],
            embeddings,
            freeze=freeze,
            dtype=kwargs.pop("dtype", embeddings.dtype),
            **kwargs,
        )

    def update(self, indices):
        self._refuse_unsupported()
        indices = jnp.asarray(indices)
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise TypeError(f"Embedding: indices must be integers, got {indices.dtype}")
        onehot = jax.nn.one_hot(indices, self.num_embeddings, dtype=self.weight.value.dtype)
        return ops.matmul(onehot, self.weight.value)
