"""brainunit quantities through the ETP ops: the primitives see mantissas, the caller units.

An ETP op is bilinear in (input, weight), so its output's unit is the product of theirs; a bias
added inside the op must carry that unit. Arrays without units pass through unchanged.
"""

import brainunit as u

__all__ = ["strip", "strip_bias", "with_unit", "mantissa"]


def mantissa(v):
    """``v``'s numbers (a Quantity's mantissa, anything else unchanged)."""
    return v.mantissa if isinstance(v, u.Quantity) else v


def _unit(v):
    return v.unit if isinstance(v, u.Quantity) else None


def strip(*values):
    """(mantissas, the product of the values' units or None when none has a unit)."""
    units = [_unit(v) for v in values]
    unit = None
    for un in units:
        if un is not None and not un.is_unitless:
            unit = un if unit is None else unit * un
    return [mantissa(v) for v in values], unit


def strip_bias(b, unit):
    """The bias's mantissa in `unit` (the op's output unit); an error if the units differ."""
    if unit is None:
        if isinstance(b, u.Quantity) and not b.unit.is_unitless:
            raise u.UnitMismatchError(f"the bias has unit {b.unit} but x * w has no unit")
        return mantissa(b)
    if not isinstance(b, u.Quantity):
        raise u.UnitMismatchError(f"the bias has no unit but x * w has unit {unit}")
    return b.to_decimal(unit) if hasattr(b, "to_decimal") else b.in_unit(unit).mantissa


def with_unit(y, unit):
    """``y`` as a Quantity of `unit` (``y`` itself when unit is None)."""
    return y if unit is None else u.Quantity(y, unit=unit)
