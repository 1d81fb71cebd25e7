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


def require(module: str, package: str | None = None, extra: str | None = None, why: str = ""):
    """``module`` imported, or one ``EdgehebbError`` line saying what to install: the one way edgehebb
    imports an optional dependency (onnxruntime, cv2, tensorrt, pycuda), inside the function that needs it.

    ``package`` is what pip installs (default: the module's top-level name), ``extra`` the edgehebb extra
    that brings it. A package that is installed but fails to import (a stub wheel without its native
    library, a missing system library) says so, with the import's own reason.
    """
    import importlib

    package = package or module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if getattr(e, "name", None) in (module, module.split(".")[0]):
            raise missing_dependency(package, extra, why) from None
        hint = f"pip install 'edgehebb[{extra}]'" if extra else f"pip install {package}"
        raise EdgehebbError(f"{package} is installed but cannot be imported ({e}); reinstall it with: {hint}") from None
