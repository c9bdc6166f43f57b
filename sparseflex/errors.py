"""User-facing errors.

Everything a user can get wrong (a file, an option, a checkpoint) raises :class:`SparseFlexError` with a one-line
message naming the problem; the CLI prints it as ``error: ...`` and exits with status 2 instead of a traceback.
"""

import math
import numbers


class SparseFlexError(Exception):
    """A problem with the user's input, reported as one line."""


class InputError(SparseFlexError):
    """An input file or tensor that cannot be used (unreadable, empty, NaN, no faces, ...)."""


class OptionError(SparseFlexError):
    """An option outside its valid range."""


def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False):
    """Raise :class:`OptionError` unless ``value`` is a finite number with ``low <= value <= high`` (ends optionally
    open); return ``value``. NaN and infinities are always rejected: no option of SparseFlex means anything with them
    (a missing bound is written ``None``, never ``inf``)."""
    try:
        finite = isinstance(value, numbers.Integral) or math.isfinite(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number; got {value!r}") from None
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    if not finite:
        raise OptionError(f"{name} must be a finite number in {lo or '(-inf'}, {hi or 'inf)'}; got {value}")
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high))
    if bad:
        raise OptionError(f"{name} must be in {lo or '(-inf'}, {hi or 'inf)'}; got {value}")
    return value
