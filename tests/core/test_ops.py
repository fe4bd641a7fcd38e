"""ETP ops: forward against references (torch for conv), AD, vmap, jit, and the canonical identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

from etrace_core.ops import (
    ETP_PRIMITIVES,
    OpRule,
    conv,
    element_wise,
    etp_conv_p,
    etp_elemwise_p,
    etp_matmul_p,
    is_etp_primitive,
    matmul,
    rule_for,
)

TOL = dict(rtol=1e-12, atol=1e-12)


@jax.custom_jvp
def spike(w):
    """Heaviside step with a surrogate derivative, like a spiking threshold."""
    return (w > 0).astype(w.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    (w,), (dw,) = primals, tangents
    return spike(w), dw / (1.0 + jnp.abs(w)) ** 2


def _spike_slope(w):
    return 1.0 / (1.0 + jnp.abs(w)) ** 2


ELEM_FNS = {"exp": jnp.exp, "softplus": jax.nn.softplus, "spike": spike}


# ---------------------------------------------------------------- references


def ref_matmul(x, w, b=None, w_layout="io"):
    y = x @ (w if w_layout == "io" else w.T)
    return y if b is None else y + b


def _pads(padding, in_sizes, k_sizes, strides, dilations):
    """Explicit (lo, hi) pads per spatial dim, computed independently of the op module."""
    n = len(in_sizes)
    if padding == "VALID":
        return [(0, 0)] * n
    if padding == "SAME":
        out = []
        for size, k, s, d in zip(in_sizes, k_sizes, strides, dilations):
            total = max((int(np.ceil(size / s)) - 1) * s + d * (k - 1) + 1 - size, 0)
            out.append((total // 2, total - total // 2))
        return out
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [(p, p) for p in padding]


def _tup(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def ref_conv(x, w, b=None, stride=1, padding="SAME", dilation=1, groups=1):
    """lax reference in torch layout (unbatched x handled by adding a batch axis)."""
    n = w.ndim - 2
    batched = x.ndim == n + 2
    xb = x if batched else x[None]
    strides, dil = _tup(stride, n), _tup(dilation, n)
    pads = _pads(padding, xb.shape[2:], w.shape[2:], strides, dil)
    dn = ("NCH", "OIH", "NCH") if n == 1 else ("NCHW", "OIHW", "NCHW")
    y = lax.conv_general_dilated(
        xb, w, strides, pads, rhs_dilation=dil, dimension_numbers=dn, feature_group_count=groups
    )
    if b is not None:
        y = y + b.reshape((-1,) + (1,) * n)
    return y if batched else y[0]


def torch_conv(x, w, b=None, stride=1, padding="SAME", dilation=1, groups=1):
    n = w.ndim - 2
    tx, tw = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(w))
    tb = None if b is None else torch.from_numpy(np.array(b))
    strides, dil = _tup(stride, n), _tup(dilation, n)
    fn = F.conv1d if n == 1 else F.conv2d
    if padding == "SAME" and all(s == 1 for s in strides):
        tpad = "same"
    elif padding == "VALID":
        tpad = "valid"
    elif isinstance(padding, (int, tuple)):
        tpad = padding
    else:
        pads = _pads(padding, tx.shape[-n:], tw.shape[2:], strides, dil)
        tx = F.pad(tx, [p for pair in reversed(pads) for p in pair])
        tpad = 0
    return fn(tx, tw, tb, stride=strides, padding=tpad, dilation=dil, groups=groups).numpy()


def ref_elem(fn, w, batch_shape=()):
    return jnp.broadcast_to(fn(w), tuple(batch_shape) + w.shape)


# ---------------------------------------------------------------- helpers


def _etp_eqn(f, *args):
    eqns = [e for e in jax.make_jaxpr(f)(*args).eqns if is_etp_primitive(e.primitive)]
    assert len(eqns) == 1
    return eqns[0]


def _canonical_grad(eqn, x, w, g):
    rule = rule_for(eqn.primitive)
    X = rule.x_canon(eqn.params, x, w)
    if eqn.params["has_bias"]:
        X = jnp.concatenate([X, jnp.ones(X.shape[:-1] + (1,), X.dtype)], axis=-1)
    G = rule.y_canon(eqn.params, g)
    assert X.shape[:-1] == G.shape[:-1]
    M = jnp.einsum("...i,...o->io", X, G)
    return rule.io_to_params(eqn.params, w, M)


def check_identity(op, x, w, b, rng):
    """io_to_params(sum_l X[l]^T G[l]) equals jax.vjp of the op w.r.t. (w, b)."""
    if b is None:
        eqn = _etp_eqn(lambda x, w: op(x, w, None), x, w)
        y, vjp = jax.vjp(lambda w: op(x, w, None), w)
    else:
        eqn = _etp_eqn(op, x, w, b)
        y, vjp = jax.vjp(lambda w, b: op(x, w, b), w, b)
    g = jnp.asarray(rng.standard_normal(y.shape))
    expected = vjp(g)
    dw, db = _canonical_grad(eqn, x, w, g)
    assert dw.shape == w.shape
    np.testing.assert_allclose(dw, expected[0], **TOL)
    if b is None:
        assert db is None
    else:
        np.testing.assert_allclose(db, expected[1], **TOL)


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape))


def _stack(fn, n):
    return jnp.stack([fn(i) for i in range(n)])


# ---------------------------------------------------------------- matmul


def _mm_args(rng, lead, i, o, layout, bias):
    x = _normal(rng, *lead, i)
    w = _normal(rng, i, o) if layout == "io" else _normal(rng, o, i)
    b = _normal(rng, o) if bias else None
    return x, w, b


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lead=st.lists(st.integers(1, 4), max_size=3),
    i=st.integers(1, 6),
    o=st.integers(1, 6),
    layout=st.sampled_from(["io", "oi"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matmul_identity_random_shapes(x64, lead, i, o, layout, bias, seed):
    rng = np.random.default_rng(seed)
    x, w, b = _mm_args(rng, tuple(lead), i, o, layout, bias)
    check_identity(lambda x, w, b: matmul(x, w, b, w_layout=layout), x, w, b, rng)


@pytest.mark.parametrize("lead", [(), (5,), (3, 4)])
@pytest.mark.parametrize("layout", ["io", "oi"])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_forward_grad_identity(x64, lead, layout, bias):
    rng = np.random.default_rng(0)
    x, w, b = _mm_args(rng, lead, 3, 2, layout, bias)
    y = matmul(x, w, b, w_layout=layout)
    assert y.shape == lead + (2,) and y.dtype == jnp.float64
    np.testing.assert_allclose(y, ref_matmul(x, w, b, layout), **TOL)
    check_identity(lambda x, w, b: matmul(x, w, b, w_layout=layout), x, w, b, rng)

    args = (x, w) if b is None else (x, w, b)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    got = jax.grad(loss(lambda *a: matmul(*a, w_layout=layout)), argnums=tuple(range(len(args))))(
        *args
    )
    want = jax.grad(
        loss(lambda *a: ref_matmul(*a, w_layout=layout)), argnums=tuple(range(len(args)))
    )(*args)
    for g1, g2 in zip(got, want):
        np.testing.assert_allclose(g1, g2, **TOL)

    tangents = tuple(_normal(rng, *a.shape) for a in args)
    y1, t1 = jax.jvp(lambda *a: matmul(*a, w_layout=layout), args, tangents)
    y2, t2 = jax.jvp(lambda *a: ref_matmul(*a, w_layout=layout), args, tangents)
    np.testing.assert_allclose(y1, y2, **TOL)
    np.testing.assert_allclose(t1, t2, **TOL)

    jitted = jax.jit(lambda *a: matmul(*a, w_layout=layout))(*args)
    np.testing.assert_allclose(jitted, y, **TOL)


def test_matmul_second_order(x64):
    rng = np.random.default_rng(1)
    x, w, _ = _mm_args(rng, (4,), 3, 2, "oi", False)
    f = lambda w, g: jnp.sum(jnp.tanh(g(x, w)))
    h1 = jax.hessian(lambda w: f(w, lambda x, w: matmul(x, w, w_layout="oi")))(w)
    h2 = jax.hessian(lambda w: f(w, lambda x, w: ref_matmul(x, w, w_layout="oi")))(w)
    np.testing.assert_allclose(h1, h2, **TOL)


@pytest.mark.parametrize("layout", ["io", "oi"])
def test_matmul_vmap(x64, layout):
    rng = np.random.default_rng(2)
    n = 3
    xs = _normal(rng, 2, n, 4)  # mapped axis 1
    ws = _normal(rng, n, 4, 5) if layout == "io" else _normal(rng, n, 5, 4)
    ws = jnp.moveaxis(ws, 0, 2)  # mapped axis 2
    b = _normal(rng, 5)
    x0, w0 = xs[:, 0], ws[..., 0]
    f = lambda x, w: matmul(x, w, b, w_layout=layout)

    got = jax.vmap(f, in_axes=(1, None))(xs, w0)
    np.testing.assert_allclose(got, _stack(lambda i: f(xs[:, i], w0), n), **TOL)
    eqn = _etp_eqn(jax.vmap(f, in_axes=(1, None)), xs, w0)  # x-only vmap stays one ETP op
    assert eqn.primitive is etp_matmul_p

    got = jax.vmap(f, in_axes=(None, 2))(x0, ws)
    np.testing.assert_allclose(got, _stack(lambda i: f(x0, ws[..., i]), n), **TOL)

    got = jax.vmap(f, in_axes=(1, 2))(xs, ws)
    np.testing.assert_allclose(got, _stack(lambda i: f(xs[:, i], ws[..., i]), n), **TOL)

    bs = _normal(rng, n, 5)
    got = jax.vmap(lambda b: matmul(x0, w0, b, w_layout=layout))(bs)
    np.testing.assert_allclose(
        got, _stack(lambda i: matmul(x0, w0, bs[i], w_layout=layout), n), **TOL
    )

    xv = _normal(rng, n, 4)  # unbatched x (I,) under vmap
    got = jax.vmap(f, in_axes=(0, None))(xv, w0)
    np.testing.assert_allclose(got, _stack(lambda i: f(xv[i], w0), n), **TOL)


def test_matmul_float32():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(4), jnp.float32)
    y = jax.jit(lambda x, w, b: matmul(x, w, b, w_layout="oi"))(x, w, b)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(
        y, np.asarray(x) @ np.asarray(w).T + np.asarray(b), rtol=1e-5, atol=1e-5
    )
    gw = jax.grad(lambda w: matmul(x, w, b, w_layout="oi").sum())(w)
    assert gw.dtype == jnp.float32
    np.testing.assert_allclose(gw, np.broadcast_to(np.asarray(x).sum(0), (4, 3)), rtol=1e-5)


def test_matmul_in_jaxpr():
    jaxpr = jax.make_jaxpr(lambda x, w: matmul(x, w))(jnp.ones((2, 3)), jnp.ones((3, 4)))
    (eqn,) = jaxpr.eqns
    assert eqn.primitive is etp_matmul_p and eqn.primitive.name == "etp_matmul"
    assert eqn.params == {"w_layout": "io", "has_bias": False}


def test_matmul_bad_inputs():
    with pytest.raises(ValueError, match=r"I=4.*\(I, O\)"):
        matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=r"I=3.*\(O, I\)"):
        matmul(jnp.ones((2, 4)), jnp.ones((4, 3)), w_layout="oi")
    with pytest.raises(ValueError, match="w_layout"):
        matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), w_layout="ji")
    with pytest.raises(ValueError, match=r"b must have shape \(O,\) = \(4,\)"):
        matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"w must have shape \(I, O\)"):
        matmul(jnp.ones((2, 3)), jnp.ones((3,)))


# ---------------------------------------------------------------- conv

CONV_CASES = [
    # (spatial dims, batched, stride, padding, dilation, groups, bias)
    (1, True, 1, "SAME", 1, 1, True),
    (1, True, 2, "VALID", 1, 1, False),
    (1, False, 1, 2, 2, 1, True),
    (1, True, 3, "SAME", 1, 2, True),
    (1, False, 2, (1,), 1, 2, False),
    (2, True, 1, "SAME", 1, 1, False),
    (2, True, (2, 1), "VALID", (1, 2), 1, True),
    (2, False, 1, 1, 1, 2, True),
    (2, True, 2, (1, 0), 2, 2, True),
    (2, False, (1, 2), "SAME", 2, 1, False),
    (2, True, 2, "SAME", 1, 2, False),
]


def _conv_args(rng, n, batched, groups, bias):
    c_in, c_out = 2 * groups, 3 * groups
    spatial, kernel = ((9,), (3,)) if n == 1 else ((7, 6), (3, 2))
    x = _normal(rng, *(((2,) if batched else ()) + (c_in,) + spatial))
    w = _normal(rng, c_out, c_in // groups, *kernel)
    b = _normal(rng, c_out) if bias else None
    return x, w, b


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_matches_torch_and_identity(x64, case):
    n, batched, stride, padding, dilation, groups, bias = case
    rng = np.random.default_rng(4)
    x, w, b = _conv_args(rng, n, batched, groups, bias)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = conv(x, w, b, **kw)
    np.testing.assert_allclose(y, torch_conv(x, w, b, **kw), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, ref_conv(x, w, b, **kw), **TOL)
    check_identity(lambda x, w, b: conv(x, w, b, **kw), x, w, b, rng)


@pytest.mark.parametrize("case", [CONV_CASES[3], CONV_CASES[7], CONV_CASES[8]], ids=str)
def test_conv_grad_jvp_jit(x64, case):
    n, batched, stride, padding, dilation, groups, bias = case
    rng = np.random.default_rng(5)
    x, w, b = _conv_args(rng, n, batched, groups, bias)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    args = (x, w, b)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    got = jax.grad(loss(lambda *a: conv(*a, **kw)), argnums=(0, 1, 2))(*args)
    want = jax.grad(loss(lambda *a: ref_conv(*a, **kw)), argnums=(0, 1, 2))(*args)
    for g1, g2 in zip(got, want):
        np.testing.assert_allclose(g1, g2, **TOL)

    tangents = tuple(_normal(rng, *a.shape) for a in args)
    y1, t1 = jax.jvp(lambda *a: conv(*a, **kw), args, tangents)
    y2, t2 = jax.jvp(lambda *a: ref_conv(*a, **kw), args, tangents)
    np.testing.assert_allclose(y1, y2, **TOL)
    np.testing.assert_allclose(t1, t2, **TOL)

    np.testing.assert_allclose(jax.jit(lambda *a: conv(*a, **kw))(*args), y1, **TOL)


@pytest.mark.parametrize("batched", [True, False])
def test_conv_vmap(x64, batched):
    rng = np.random.default_rng(6)
    n_map = 3
    kw = dict(stride=2, padding=1, groups=2)
    x, w, b = _conv_args(rng, 2, batched, 2, True)
    xs = jnp.stack([x + i for i in range(n_map)], axis=1)  # mapped axis 1
    ws = jnp.stack([w * (i + 1) for i in range(n_map)], axis=-1)  # mapped axis last
    f = lambda x, w: conv(x, w, b, **kw)

    got = jax.vmap(f, in_axes=(1, None))(xs, w)
    np.testing.assert_allclose(got, _stack(lambda i: f(xs[:, i], w), n_map), **TOL)
    assert _etp_eqn(jax.vmap(f, in_axes=(1, None)), xs, w).primitive is etp_conv_p

    got = jax.vmap(f, in_axes=(None, -1))(x, ws)
    np.testing.assert_allclose(got, _stack(lambda i: f(x, ws[..., i]), n_map), **TOL)

    got = jax.vmap(f, in_axes=(1, -1))(xs, ws)
    np.testing.assert_allclose(got, _stack(lambda i: f(xs[:, i], ws[..., i]), n_map), **TOL)


def test_conv_float32_and_params():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 2, 3)), jnp.float32)
    y = jax.jit(lambda x, w: conv(x, w, stride=2, padding=1, groups=2))(x, w)
    assert y.dtype == jnp.float32
    want = F.conv1d(
        torch.from_numpy(np.array(x)), torch.from_numpy(np.array(w)), stride=2, padding=1, groups=2
    ).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    eqn = _etp_eqn(lambda x, w: conv(x, w, stride=2, padding=1, groups=2), x, w)
    assert eqn.params == dict(
        window_strides=(2,),
        padding=((1, 1),),
        rhs_dilation=(1,),
        feature_group_count=2,
        has_bias=False,
        batched=True,
    )
    hash(tuple(eqn.params.items()))


def test_conv_bad_inputs():
    x, w = jnp.ones((1, 4, 8)), jnp.ones((6, 2, 3))
    with pytest.raises(ValueError, match="'SAME' or 'VALID'"):
        conv(x, w, padding="FULL", groups=2)
    with pytest.raises(ValueError, match=r"\(C_out, C_in/groups, \*K\) = \(6, 4, \.\.\.\)"):
        conv(x, w)
    with pytest.raises(ValueError, match=r"\(B, C_in, \*S\) or \(C_in, \*S\)"):
        conv(jnp.ones((1, 1, 4, 8)), w, groups=2)
    with pytest.raises(ValueError, match="groups must be a positive int dividing"):
        conv(x, w, groups=3)
    with pytest.raises(ValueError, match="1, 2 or 3 spatial"):
        conv(jnp.ones((1, 4, 8, 8, 8, 8)), jnp.ones((6, 4, 3, 3, 3, 3)))
    with pytest.raises(ValueError, match="stride"):
        conv(x, w, stride=(1, 1), groups=2)
    with pytest.raises(ValueError, match=r"b must have shape \(C_out,\) = \(6,\)"):
        conv(x, w, jnp.ones(4), groups=2)
    with pytest.raises(ValueError, match="dilated kernel size"):
        conv(jnp.ones((1, 4, 2)), w, padding="VALID", groups=2)


# ---------------------------------------------------------------- element_wise


@pytest.mark.parametrize("name", list(ELEM_FNS))
@pytest.mark.parametrize("batch_shape", [(), (4,)])
@pytest.mark.parametrize("w_shape", [(3,), (2, 3)])
def test_elemwise_forward_grad_identity(x64, name, batch_shape, w_shape):
    fn = ELEM_FNS[name]
    rng = np.random.default_rng(8)
    w = _normal(rng, *w_shape)
    op = lambda w: element_wise(fn, w, batch_shape=batch_shape)
    y = op(w)
    assert y.shape == batch_shape + w_shape
    np.testing.assert_allclose(y, ref_elem(fn, w, batch_shape), **TOL)

    eqn = _etp_eqn(op, w)
    assert eqn.primitive is etp_elemwise_p
    y, vjp = jax.vjp(op, w)
    g = _normal(rng, *y.shape)
    (expected,) = vjp(g)
    dw, db = _canonical_grad(eqn, None, w, g)
    assert db is None
    np.testing.assert_allclose(dw, expected, **TOL)

    loss = lambda f: lambda w: jnp.sum(jnp.sin(f(w)) * g)
    np.testing.assert_allclose(
        jax.grad(loss(op))(w), jax.grad(loss(lambda w: ref_elem(fn, w, batch_shape)))(w), **TOL
    )
    t = _normal(rng, *w_shape)
    _, t1 = jax.jvp(op, (w,), (t,))
    _, t2 = jax.jvp(lambda w: ref_elem(fn, w, batch_shape), (w,), (t,))
    np.testing.assert_allclose(t1, t2, **TOL)
    np.testing.assert_allclose(jax.jit(op)(w), y, **TOL)


def test_elemwise_custom_jvp_rule_is_used(x64):
    w = jnp.array([-1.0, 0.5, 2.0])
    grad = jax.grad(lambda w: element_wise(spike, w, batch_shape=(2,)).sum())(w)
    np.testing.assert_allclose(grad, 2 * _spike_slope(w), **TOL)
    params = _etp_eqn(lambda w: element_wise(spike, w), w).params
    dw, _ = rule_for(etp_elemwise_p).io_to_params(params, w, jnp.ones((1, 3)))
    np.testing.assert_allclose(dw, _spike_slope(w), **TOL)


def test_elemwise_vmap_and_float32():
    w = jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 6
    f = lambda w: element_wise(jnp.exp, w, batch_shape=(4,))
    got = jax.vmap(f, in_axes=1)(w)
    np.testing.assert_allclose(got, _stack(lambda i: f(w[:, i]), 3), rtol=1e-6)
    assert got.dtype == jnp.float32
    assert _etp_eqn(jax.vmap(f, in_axes=1), w).primitive is etp_elemwise_p
    g = jax.jit(jax.grad(lambda w: f(w).sum()))(w)
    np.testing.assert_allclose(g, 4 * np.exp(np.asarray(w)), rtol=1e-5)


def test_elemwise_bad_inputs():
    with pytest.raises(ValueError, match=r"expected fn\(w\) of shape \(3,\)"):
        element_wise(jnp.sum, jnp.ones(3))
    with pytest.raises(ValueError, match="callable"):
        element_wise(3.0, jnp.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        element_wise(jnp.exp, jnp.ones(3), batch_shape=(-1,))


# ---------------------------------------------------------------- rules


def test_rule_lookup():
    assert ETP_PRIMITIVES[:3] == (etp_matmul_p, etp_conv_p, etp_elemwise_p)
    assert all(is_etp_primitive(p) for p in ETP_PRIMITIVES)
    assert not is_etp_primitive(lax.add_p)
    for p in ETP_PRIMITIVES:
        assert isinstance(rule_for(p), OpRule)
    names = ["etp_matmul", "etp_conv", "etp_elemwise", "etp_lora_mm", "etp_lora_mv"]
    assert [p.name for p in ETP_PRIMITIVES] == names
    with pytest.raises(ValueError, match="not an ETP primitive"):
        rule_for(lax.add_p)


def test_y_canon_position_maps():
    """y_canon applied to integer output positions gives (L..., O) maps of the right shape."""
    x, w = jnp.ones((2, 4, 7, 6)), jnp.ones((6, 2, 3, 3))
    eqn = _etp_eqn(lambda x, w: conv(x, w, stride=2, groups=2), x, w)
    y_shape = eqn.outvars[0].aval.shape
    pos = jnp.arange(np.prod(y_shape)).reshape(y_shape)
    Y = rule_for(etp_conv_p).y_canon(eqn.params, pos)
    X = rule_for(etp_conv_p).x_canon(eqn.params, x, eqn.invars[1].aval)
    assert Y.dtype == pos.dtype and Y.shape == (2, 4, 3, 6) and X.shape == (2, 4, 3, 4 * 9)
    np.testing.assert_array_equal(Y[1, 2, 0], pos[1, :, 2, 0])

    w = jnp.ones((2, 3))
    eqn = _etp_eqn(lambda w: element_wise(jnp.exp, w, batch_shape=(5,)), w)
    pos = jnp.arange(30).reshape(5, 2, 3)
    Y = rule_for(etp_elemwise_p).y_canon(eqn.params, pos)
    assert Y.shape == (5, 6) and Y.dtype == pos.dtype
    assert rule_for(etp_elemwise_p).x_canon(eqn.params, None, w).shape == (5, 1)

    eqn = _etp_eqn(lambda x, w: matmul(x, w), jnp.ones(3), jnp.ones((3, 2)))
    assert rule_for(etp_matmul_p).y_canon(eqn.params, jnp.arange(2)).shape == (2,)


def test_io_to_params_rejects_wrong_shape():
    eqn = _etp_eqn(lambda x, w, b: matmul(x, w, b), jnp.ones(3), jnp.ones((3, 2)), jnp.ones(2))
    with pytest.raises(ValueError, match=r"\(I\+1, O\) = \(4, 2\)"):
        rule_for(etp_matmul_p).io_to_params(eqn.params, jnp.ones((3, 2)), jnp.ones((3, 2)))
