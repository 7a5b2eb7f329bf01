"""Registry of task suites: ``register`` a suite class, ``create`` it by name.

A suite's options are the keyword parameters of its constructor; their defaults come from
the constructor's signature and their help lines from the class attribute ``option_help``,
so that a command-line interface can list every suite with its options and defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.base import TaskSuite

_SUITES: dict[str, type[TaskSuite]] = {}


@dataclass(frozen=True)
class OptionInfo:
    """One option of a task suite.

    Attributes:
        default: the value used when the option is not given (``None`` when required).
        help: what the option does and which values it accepts.
        required: whether :func:`create` must be given the option.
    """

    default: Any
    help: str
    required: bool


def _option_infos(suite_class: type[TaskSuite]) -> dict[str, OptionInfo]:
    """Read the options of ``suite_class`` from its constructor and its ``option_help``."""
    parameters = list(inspect.signature(suite_class.__init__).parameters.values())[1:]
    help_lines = getattr(suite_class, "option_help", None)
    if not isinstance(help_lines, dict):
        raise TypeError(f"{suite_class.__name__} must define a class attribute option_help: dict[str, str]")
    infos = {}
    for parameter in parameters:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(
                f"{suite_class.__name__}.__init__ must list its options explicitly, "
                f"not through *{parameter.name} or **{parameter.name}"
            )
        if parameter.name not in help_lines:
            raise TypeError(f"{suite_class.__name__}.option_help has no help line for option {parameter.name!r}")
        required = parameter.default is inspect.Parameter.empty
        infos[parameter.name] = OptionInfo(
            default=None if required else parameter.default, help=help_lines[parameter.name], required=required
        )
    extra = sorted(set(help_lines) - set(infos))
    if extra:
        raise TypeError(f"{suite_class.__name__}.option_help describes options its constructor lacks: {extra}")
    return infos


def register(name: str) -> Callable[[type[TaskSuite]], type[TaskSuite]]:
    """Class decorator that registers a :class:`TaskSuite` subclass under ``name``.

    Sets the class attribute ``name``. Raises ``ValueError`` if ``name`` is taken and
    ``TypeError`` if the class is not a TaskSuite or its options are not all described in
    ``option_help``.
    """

    def decorator(suite_class: type[TaskSuite]) -> type[TaskSuite]:
        if not (inspect.isclass(suite_class) and issubclass(suite_class, TaskSuite)):
            raise TypeError(f"@register({name!r}) must decorate a TaskSuite subclass, got {suite_class!r}")
        if name in _SUITES:
            raise ValueError(f"a task suite named {name!r} is already registered ({_SUITES[name].__name__})")
        _option_infos(suite_class)
        suite_class.name = name
        _SUITES[name] = suite_class
        return suite_class

    return decorator


def available() -> list[str]:
    """Names of all registered task suites, sorted."""
    return sorted(_SUITES)


def _suite_class(name: str) -> type[TaskSuite]:
    if name not in _SUITES:
        raise ValueError(f"unknown task suite {name!r}; valid names: {', '.join(available())}")
    return _SUITES[name]


def suite_class(name: str) -> type[TaskSuite]:
    """The class registered as ``name``, to read what it declares without building its data."""
    return _suite_class(name)


def options(name: str) -> dict[str, OptionInfo]:
    """The options of the suite ``name``: option name -> :class:`OptionInfo` (default, help, required)."""
    return _option_infos(_suite_class(name))


def _describe(infos: dict[str, OptionInfo]) -> str:
    return ", ".join(
        f"{option} (required)" if info.required else f"{option} (default {info.default!r})"
        for option, info in infos.items()
    )


def create(name: str, **suite_options: Any) -> TaskSuite:
    """Create the task suite registered as ``name`` with the given options.

    Raises:
        ValueError: ``name`` is not registered (the message lists the valid names), or an
            option value is invalid (the suite's message names the option and its range).
        TypeError: an option is unknown or a required option is missing (the message lists
            the valid options with their defaults).
    """
    suite_class = _suite_class(name)
    infos = _option_infos(suite_class)
    unknown = sorted(set(suite_options) - set(infos))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for task suite {name!r}; valid options: {_describe(infos)}")
    missing = sorted(option for option, info in infos.items() if info.required and option not in suite_options)
    if missing:
        raise TypeError(f"task suite {name!r} needs option(s) {missing}; valid options: {_describe(infos)}")
    return suite_class(**suite_options)


def run_defaults(name: str) -> dict[str, Any]:
    """The training defaults that suite ``name`` declares (``TaskSuite.run_defaults``)."""
    return dict(_suite_class(name).run_defaults)
