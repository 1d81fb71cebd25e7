"""The one exception type for mistakes a user can fix (bad paths, bad values, missing extras).

The CLI catches it once and prints it as a single ``Error: ...`` line; anything else is a bug and
keeps its traceback.
"""


class EdgehebbError(Exception):
    """A user-facing error: its message alone must say what is wrong and what to do."""


def missing_dependency(package: str, extra: str | None = None, why: str = "") -> EdgehebbError:
    """Error for an optional dependency that is not installed, with the install line."""
    hint = f"pip install 'edgehebb[{extra}]'" if extra else f"pip install {package}"
    what = f" ({why})" if why else ""
    return EdgehebbError(f"{package} is not installed{what}; install it with: {hint}")
