"""Ship a user's code to Ray workers by value.

An adapter instance from the Python API (:mod:`bgd_dist.api`) holds the user's
model, data and loss. Ray pickles it with cloudpickle, which sends a class or
function *by reference* when it comes from an importable module, and a worker
that cannot import that module (a script's helper module, a test file) fails.
:func:`register_user_modules` registers the modules the adapter's objects come
from by value, unless they are installed packages, the standard library or this
project's own packages (which every worker imports).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from ray import cloudpickle

_INSTALLED = tuple(str(Path(p).resolve()) for p in {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")})
_OWN = ("bgd_dist", "classification", "detection", "torch", "torchvision", "ray", "numpy")


def user_module(obj) -> object | None:
    """The module ``obj`` (a class, function or instance) is defined in, when it is a user's
    module that a worker may not be able to import; else None."""
    name = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
    module = sys.modules.get(name) if name else None
    if module is None or name == "__main__" or name.split(".")[0] in _OWN:
        return None                      # __main__ already travels by value
    path = getattr(module, "__file__", None)
    if path is None or str(Path(path).resolve()).startswith(_INSTALLED):
        return None
    return module


def register_user_modules(adapter) -> list[str]:
    """Register the user's modules behind ``adapter.shipped_objects()`` for pickling by value;
    returns their names."""
    names = []
    for obj in adapter.shipped_objects():
        module = user_module(obj)
        if module is not None and module.__name__ not in names:
            cloudpickle.register_pickle_by_value(module)
            names.append(module.__name__)
    return names
