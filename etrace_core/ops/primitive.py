"""Define an ETP primitive from its plain jnp reference: impl, abstract eval and lowering."""

import jax
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import mlir


def primitive_from_reference(name: str, reference) -> Primitive:
    """A primitive evaluated, shape-inferred and lowered through `reference(*operands, **params)`.

    Differentiation and batching rules stay with each op (they carry the op's meaning).
    """
    prim = Primitive(name)
    prim.def_impl(reference)

    def abstract_eval(*avals, **params):
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
        out = jax.eval_shape(lambda *a: reference(*a, **params), *args)
        return ShapedArray(out.shape, out.dtype)

    prim.def_abstract_eval(abstract_eval)
    mlir.register_lowering(prim, mlir.lower_fun(reference, multiple_results=False))
    return prim
