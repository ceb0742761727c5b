"""User-facing errors. The CLI turns any ``NoiseSearchError`` into a one-line message and exit 2."""


class NoiseSearchError(Exception):
    """An error caused by the user's input (names, shapes, files, budgets): say what to do."""


class BudgetError(NoiseSearchError):
    """A budget too small for the requested work, or an attempt to spend past it."""


def unknown_name(kind: str, name: str, valid) -> NoiseSearchError:
    """``unknown <kind> 'x'; valid <kinds>: a, b, c`` (names in the order given)."""
    plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
    return NoiseSearchError(f"unknown {kind} {name!r}; valid {plural}: {', '.join(map(str, valid))}")
