"""The one error type of parity_kit."""

from __future__ import annotations


class ParityKitError(Exception):
    """Raised for every problem the user can fix: the message names what was wrong and what to do.

    >>> try:
    ...     raise ParityKitError("pattern 'foo.*' matched no module; close names: 'model.foo'")
    ... except ParityKitError as e:
    ...     print(type(e).__name__)
    ParityKitError
    """
