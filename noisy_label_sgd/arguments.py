"""What every public entry point takes of its plain arguments, checked at the call in torch.optim's
style: the message names the argument and the value ("Invalid chunk_size: 0 (...)")."""

from __future__ import annotations

import numbers

__all__ = ["is_int", "is_real", "check_positive_int"]


def is_int(value: object) -> bool:
    """An integer as torch.optim takes one: a Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number, not a bool (``std=True`` is a mistake, not 1.0)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value: object, *, optional: bool = True) -> int | None:
    """``value`` as an int >= 1 (None passes where ``optional``)."""
    if optional and value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be a positive int)")
    return int(value)
