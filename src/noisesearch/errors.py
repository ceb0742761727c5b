"""User-facing errors. The CLI turns any ``NoiseSearchError`` into a one-line message and exit 2."""


class NoiseSearchError(Exception):
    """An error caused by the user's input (names, shapes, files, budgets): say what to do."""


class BudgetError(NoiseSearchError):
    """A budget too small for the requested work, or an attempt to spend past it."""


def unknown_name(kind: str, name: str, valid) -> NoiseSearchError:
    valid = sorted(valid)
    return NoiseSearchError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")
