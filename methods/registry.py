"""Name -> method class, and the factory that validates hyperparameters.

``create("cagrad", n_tasks=3, calpha=0.4)`` builds a native method; ``create("libmtl:cagrad",
...)`` wraps LibMTL 1.1.5's own class behind the same interface (see :mod:`methods.libmtl`).
"""

from __future__ import annotations

from typing import Any

from methods.base import HParam, Method

LIBMTL_PREFIX = "libmtl:"

_NATIVE: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _NATIVE:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    _NATIVE[cls.name] = cls
    return cls


def available(include_libmtl: bool = False) -> list[str]:
    """Names accepted by :func:`create`, native first, sorted."""
    names = sorted(_NATIVE)
    if include_libmtl:
        from methods.libmtl import LIBMTL_METHODS

        names += [LIBMTL_PREFIX + n for n in sorted(LIBMTL_METHODS)]
    return names


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``, native or ``libmtl:<name>``."""
    if name.startswith(LIBMTL_PREFIX):
        from methods.libmtl import libmtl_class

        return libmtl_class(name[len(LIBMTL_PREFIX) :])
    try:
        return _NATIVE[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; valid: {', '.join(available(include_libmtl=True))}"
        ) from None


def hparams(name: str) -> tuple[HParam, ...]:
    """The hyperparameters that method ``name`` declares."""
    return method_class(name).hparams


def create(name: str, n_tasks: int, **hparams: Any) -> Method:
    """A new instance of method ``name`` for ``n_tasks`` tasks, hyperparameters by name."""
    return method_class(name)(n_tasks, **hparams)
