"""Command line: ``python -m bench run ...`` and ``python -m bench list``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from rich.console import Console
from rich.table import Table

import methods
import tasks
from bench.errors import INPUT_ERRORS, print_error
from bench.profile import add_profile_parser, profile_command
from bench.step import GRAD_LEVELS
from bench.report import add_report_parser, report_command
from bench.signals import interruption_exit_code, interruption_reason, sigterm_as_interrupt
from bench.spec import OPTIMIZERS, RUN_DEFAULTS, SCHEDULERS, hparams_from_flags, load_config_file, option_value, parse_assignments, resolve_spec
from bench.sweep_cli import StorageOptions, add_run_sweep_options, add_tune_parser, add_worker_parser


def _run_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="train methods on a task suite and log every run to MLflow",
        description="Train every (method, seed) on a task suite; print a comparison table. "
        "Options not given come from --config, then from the suite's and the built-in defaults.",
        argument_default=argparse.SUPPRESS,
    )
    add_run_options(run)
    add_run_sweep_options(run)


def add_run_options(run: argparse.ArgumentParser) -> None:
    """The options of a run spec, shared by ``run`` and ``tune``."""
    run.add_argument("--config", help="YAML or TOML file with run options (flags override it)")
    run.add_argument("--methods", help="'all' (every native method), 'libmtl:all', or a comma list; libmtl:<name> allowed")
    run.add_argument("--task", help=f"task suite: {', '.join(tasks.available())}")
    run.add_argument("--seeds", help=f"comma list of seeds (default {RUN_DEFAULTS['seeds'][0]})")
    run.add_argument("--epochs", type=int, help="training epochs (default: the suite's)")
    run.add_argument("--batch-size", type=int, dest="batch_size", help="training batch size")
    run.add_argument("--lr", type=float, help="learning rate, the same for every method")
    run.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer, the same for every method (default adam)")
    run.add_argument("--weight-decay", type=float, dest="weight_decay", help="weight decay (default 0)")
    run.add_argument("--scheduler", choices=SCHEDULERS, help="learning-rate schedule (default none)")
    run.add_argument("--lr-step-size", type=int, dest="lr_step_size", help="step scheduler: epochs between decays (default 100)")
    run.add_argument("--lr-gamma", type=float, dest="lr_gamma", help="step scheduler: learning-rate factor at each decay (default 0.5)")
    run.add_argument("--backbone", help="encoder: resnet18 (default), resnet50, densenet121")
    run.add_argument("--image-size", type=int, dest="image_size", help="task option: image side in pixels")
    run.add_argument("--data-dir", dest="data_dir", help="task option: where the data set lives")
    run.add_argument("--subset", type=int, help="task option: train on a stratified subset of N images (0 = all)")
    run.add_argument("--pretrained", help="task option: none, imagenet (local torch hub cache) or a weights file")
    run.add_argument("--task-opt", action="append", dest="task_opt", metavar="KEY=VALUE", help="any task option (repeatable)")
    run.add_argument("--hp", action="append", metavar="METHOD.NAME=VALUE", help="a method hyperparameter (repeatable), e.g. cagrad.calpha=0.4")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--results", help="directory for results, stores and summaries (default results/)")
    run.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI (default sqlite:///<results>/mlflow.db; MLFLOW_TRACKING_URI honoured)")
    run.add_argument("--no-checkpoint", dest="save_checkpoint", action="store_false", help="do not store the best checkpoint as an MLflow artifact")
    run.add_argument("--grad-level", dest="grad_level", choices=GRAD_LEVELS, help="gradient methods weigh by per-task gradients of the shared parameters (default) or of the shared features (MGDA-UB)")
    run.add_argument("--amp", action="store_true", help="bf16 autocast of the forward pass (CUDA only)")


def flags_to_layers(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config-file layer, flag layer) from parsed ``run`` arguments."""
    given = dict(vars(args))
    given.pop("command", None)
    config = load_config_file(given.pop("config")) if "config" in given else {}
    task_options: dict[str, Any] = {}
    for key in ("image_size", "data_dir", "subset", "pretrained"):
        if key in given:
            task_options[key] = given.pop(key)
    for key, value in parse_assignments(given.pop("task_opt", []), "--task-opt").items():
        task_options[key] = option_value(value)
    if task_options:
        given["task_options"] = task_options
    if "hp" in given:
        given["hparams"] = hparams_from_flags(given.pop("hp"))
    return config, given


LISTED_RUN_DEFAULTS: tuple[str, ...] = (
    "epochs", "batch_size", "lr", "optimizer", "weight_decay", "scheduler", "lr_step_size", "lr_gamma", "backbone",
)
"""The run options ``list`` shows for each task suite: the training setup, which a suite may set."""


def _default_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def list_command(console: Console) -> None:
    """Print every method with its hyperparameters, every task suite with its options, and the
    training defaults: built in and each suite's own."""
    table = Table(title="methods (python -m bench run --methods NAME --hp NAME.KEY=VALUE)")
    for column in ("method", "hyperparameter", "default", "valid values"):
        table.add_column(column)
    for name in methods.available(include_libmtl=True):
        declared = methods.hparams(name)
        if not declared:
            table.add_row(name, "-", "", "")
        for i, h in enumerate(declared):
            table.add_row(name if i == 0 else "", h.name, repr(h.default), h.describe())
    console.print(table)
    suites = Table(title="task suites (python -m bench run --task NAME --task-opt KEY=VALUE)")
    for column in ("task", "option", "default", "help"):
        suites.add_column(column)
    for name in tasks.available():
        for i, (option, info) in enumerate(tasks.options(name).items()):
            suites.add_row(name if i == 0 else "", option, "(required)" if info.required else repr(info.default), info.help)
    console.print(suites)
    defaults = Table(title="training defaults, built in and each suite's own (flags and --config override them)")
    defaults.add_column("task", no_wrap=True)
    for key in LISTED_RUN_DEFAULTS:
        defaults.add_column(key.replace("_", "\n"))  # one word a line: the table fits 120 columns
    defaults.add_row("(built-in)", *[_default_text(RUN_DEFAULTS[key]) for key in LISTED_RUN_DEFAULTS])
    for name in tasks.available():
        values = {**RUN_DEFAULTS, **tasks.run_defaults(name)}
        defaults.add_row(name, *[_default_text(values[key]) for key in LISTED_RUN_DEFAULTS])
    console.print(defaults)


def _other_command(args: argparse.Namespace, console: Console, argv: Sequence[str]) -> int:
    """Run ``profile``, ``report``, ``tune`` or ``worker``; return its exit code.

    Each command reports the bad input it checks itself; what it does not check is left to
    :func:`main`, which reports :data:`~bench.errors.INPUT_ERRORS` likewise.
    """
    if args.command == "profile":
        return profile_command(args, console)
    if args.command == "report":
        from mlflow.exceptions import MlflowException  # heavy imports (MLflow) only when reporting

        try:
            return report_command(args, console, argv)
        except MlflowException as error:
            return print_error(
                console,
                f"the MLflow store failed: {error}. Check --results or --tracking-uri (or MLFLOW_TRACKING_URI) "
                "and, for a tracking server, that it is running",
            )
    if args.command == "tune":
        from bench.tune import tune_command  # heavy imports (MLflow) only when running

        return tune_command(args, console)
    from bench.worker import worker_command

    return worker_command(args, console)


LOG_WIDTH = 10_000
"""Console width when standard output is not a terminal: wide enough that no table is cut."""
TRAINING_COMMANDS = ("run", "tune", "worker")
"""The commands that train, and so handle SIGTERM like Ctrl-C."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: the process's arguments); return its exit code.

    In the commands that train, SIGTERM is handled like Ctrl-C (:mod:`bench.signals`): runs
    end KILLED and resumable, and the exit code is 143 (130 for Ctrl-C).
    """
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmark harness for multi-task weighting methods.")
    commands = parser.add_subparsers(dest="command", required=True)
    _run_parser(commands)
    commands.add_parser("list", help="list methods with their hyperparameters, and task suites with their options")
    add_report_parser(commands)
    add_profile_parser(commands)
    add_run_options(add_tune_parser(commands))
    add_worker_parser(commands)
    args = parser.parse_args(argv)
    # In a log file, names and tables are printed whole: nothing is cut at a terminal's width.
    console = Console(width=None if sys.stdout.isatty() else LOG_WIDTH)
    with sigterm_as_interrupt() if args.command in TRAINING_COMMANDS else nullcontext():
        return _command(args, console, argv)


def _command(args: argparse.Namespace, console: Console, argv: Sequence[str] | None) -> int:
    """Run the parsed command ``args.command``; return its exit code."""
    if args.command == "list":
        list_command(console)
        return 0
    if args.command != "run":
        try:
            return _other_command(args, console, sys.argv[1:] if argv is None else argv)
        except INPUT_ERRORS as error:
            return print_error(console, error)
    from bench.runner import run_sweep  # heavy imports (MLflow) only when running

    try:
        options = StorageOptions.pop(args)
        spec = resolve_spec(*flags_to_layers(args))
    except INPUT_ERRORS as error:
        return print_error(console, error)
    try:
        results = run_sweep(spec, console, options)
    except KeyboardInterrupt as interrupt:
        console.print(
            f"[yellow]{interruption_reason(interrupt)}: the current run is marked KILLED and resumes when the "
            "same command is run again; the store is readable[/]"
        )
        return interruption_exit_code(interrupt)
    except INPUT_ERRORS as error:
        return print_error(console, error)
    # A run that diverged (non-finite loss) is a result; a run that crashed, or a grid cell
    # left undone (KILLED: its worker is elsewhere), is an error.
    return 1 if any(r.crashed or r.status == "KILLED" for r in results) else 0
