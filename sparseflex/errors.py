"""User-facing errors.

Everything a user can get wrong (a file, an option, a checkpoint) raises :class:`SparseFlexError` with a one-line
message naming the problem; the CLI prints it as ``error: ...`` and exits with status 2 instead of a traceback.
"""


class SparseFlexError(Exception):
    """A problem with the user's input, reported as one line."""


class InputError(SparseFlexError):
    """An input file or tensor that cannot be used (unreadable, empty, NaN, no faces, ...)."""


class OptionError(SparseFlexError):
    """An option outside its valid range."""


def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False):
    """Raise :class:`OptionError` unless ``low <= value <= high`` (ends optionally open); return ``value``."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high))
    if bad:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        raise OptionError(f"{name} must be in {lo or '(-inf'}, {hi or 'inf)'}; got {value}")
    return value
