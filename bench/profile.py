"""``python -m bench profile``: the cost of one training step per method, beside the floor and LibMTL.

Every method trains its own copy of the same freshly seeded model on the same fixed batch (so
data loading is not measured) through :func:`bench.step.training_step`, the very step the
training engine runs. After ``--warmup`` untimed steps each, the ``--steps`` timed steps are
taken in rounds: one step of every method per round, the order rotated each round, so slow
drifts of the machine (other load, frequency, memory state) fall on all methods alike instead
of on whichever ran last (all the models stay in memory together: for a large model, profile
a few methods at a time). Each step is timed by phase with :class:`bench.timing.PhaseTimer`
(CUDA events on a GPU, the monotonic clock on a CPU); the table shows medians over steps.
Methods with an epoch-level schedule are first moved past their first epoch (GradNorm weighs by
gradients only from its second epoch).

Two ratios, measured in the same process:

- ``x EW``: a method's median step over equal weighting's;
- ``x floor``: over the floor, the least any exact per-task-gradient method must do: the
  forward pass, a plain loop of one ``torch.autograd.grad`` per task over the shared
  parameters, and the optimizer step (the floor does not even add the T gradients up).

Memory per method: ``state MB``, the bytes of its model, optimizer state and method parameters
(counted from the tensors); ``step +MB``, the rise during one extra, untimed step over the
step's start (the allocator's peak on a GPU; on a CPU the kernel's peak resident set size, after
handing freed heap memory back to the system); ``peak MB``, their sum.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

import methods
import tasks
from bench.errors import INPUT_ERRORS, print_error
from bench.spec import check_backbone, check_batch_size, check_grad_level, option_value, parse_assignments, resolve_device, resolve_methods
from bench.step import GRAD_LEVELS, autocast, seed_everything, supplied_hparams, training_step
from bench.timing import STEP_PHASES, PhaseTimer
from methods.base import EpochStats
from methods.libmtl import LibMTLDefectError

FLOOR = "floor"
DEFAULT_IMAGE_SIZE = 64
"""``--image-size`` of the suites that take the option, when not given."""


def add_profile_parser(commands: Any) -> None:
    """Register ``profile`` on the CLI's subcommands."""
    profile = commands.add_parser(
        "profile",
        help="time one training step per method by phase, with ratios to EW and to the per-task-gradient floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    profile.add_argument("--task", default="cxr14-synthetic", help="task suite (default cxr14-synthetic)")
    profile.add_argument("--methods", default="all", help="'all', 'libmtl:all', or a comma list (libmtl:<name> allowed)")
    profile.add_argument("--steps", type=int, default=5, help="timed steps per method (default 5)")
    profile.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    profile.add_argument("--tasks", type=int, dest="n_tasks", help="use only the first N tasks of the suite")
    profile.add_argument("--grad-level", choices=GRAD_LEVELS, default="parameters", dest="grad_level")
    profile.add_argument("--batch-size", type=int, default=16, dest="batch_size")
    profile.add_argument("--image-size", type=int, dest="image_size",
                         help=f"task option of the suites that have one (default {DEFAULT_IMAGE_SIZE})")
    profile.add_argument("--backbone", default="resnet18")
    profile.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    profile.add_argument("--amp", action="store_true", help="bf16 autocast of the forward pass (CUDA only)")
    profile.add_argument("--task-opt", action="append", default=[], dest="task_opt", metavar="KEY=VALUE")
    profile.add_argument("--json", help="also write the rows and the machine to this JSON file")


def expand_methods(text: str) -> list[str]:
    """The methods to profile (``all``, ``libmtl:all`` or a comma list), with ``ew`` first."""
    return list(dict.fromkeys(["ew", *resolve_methods(text)]))


def _floor_step(model: Any, suite: tasks.TaskSuite, optimizer: torch.optim.Optimizer, x: Any, y: Any,
                shared: list[torch.Tensor], timer: PhaseTimer, n_tasks: int) -> None:
    with timer("forward"):
        losses = suite.losses(model(x), y).float()[:n_tasks]
    with timer("gradients"):
        for t in range(n_tasks):
            grads = torch.autograd.grad(losses[t], shared, retain_graph=t < n_tasks - 1)
    with timer("optimizer"):
        for p, g in zip(shared, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    timer.step()


@dataclass
class _Contestant:
    """One method's model, optimizer and measurements in an interleaved profile."""

    name: str
    model: Any
    method: methods.Method | None  # None: the floor
    optimizer: torch.optim.Optimizer
    shared: list[torch.Tensor]
    steps: list[dict[str, float]] = field(default_factory=list)
    step_increase_mb: float = 0.0
    refused: str | None = None


def _prepare(name: str, suite: tasks.TaskSuite, batch: tuple[Any, Any], args: argparse.Namespace,
             device: torch.device, n_tasks: int) -> _Contestant:
    seed_everything(0)
    model = suite.build_model(args.backbone).to(device)
    method = None
    if name != FLOOR:
        method = methods.create(name, n_tasks, **supplied_hparams({}, suite, name, seed=0, n_tasks=n_tasks)).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *(method.parameters() if method else [])], lr=1e-4)
    contestant = _Contestant(name, model, method, optimizer, model.shared_parameters())
    if method is not None:  # one epoch of one step: past the first-epoch schedules (GradNorm)
        _take_step(contestant, suite, batch, args, n_tasks)
        with torch.no_grad():
            losses = suite.losses(model(batch[0]), batch[1]).float()[:n_tasks]
        method.epoch_end(EpochStats(train_loss=losses.cpu(), train_accuracy=torch.full((n_tasks,), 0.5)))
    return contestant


def _state_mb(contestant: _Contestant) -> float:
    """MB of the contestant's parameters, method parameters and optimizer state."""
    method_params = list(contestant.method.parameters()) if contestant.method is not None else []
    optimizer_state = [t for state in contestant.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors = [*contestant.model.parameters(), *method_params, *optimizer_state]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _take_step(contestant: _Contestant, suite: tasks.TaskSuite, batch: tuple[Any, Any], args: argparse.Namespace,
               n_tasks: int, measure_memory: bool = False) -> None:
    """One step of ``contestant``; a LibMTL method that refuses the input is marked refused.

    A timed step is recorded in ``steps``; with ``measure_memory`` the step is not timed but
    its memory rise is recorded, from a heap handed back to the system first (doing so before
    a timed step would make it pay the page faults of memory the allocator would have reused).
    """
    if measure_memory:
        _return_free_memory()
    timer = PhaseTimer(next(contestant.model.parameters()).device)
    try:
        if contestant.method is None:
            _floor_step(contestant.model, suite, contestant.optimizer, *batch, contestant.shared, timer, n_tasks)
        else:
            training_step(contestant.model, suite, contestant.method, contestant.optimizer, *batch, contestant.shared,
                          timer, grad_level=args.grad_level, amp=args.amp, n_tasks=n_tasks)
    except LibMTLDefectError as error:
        contestant.refused = str(error)
        return
    timing = timer.epoch()
    if measure_memory:
        contestant.step_increase_mb = timing.peak_memory_increase_mb
    else:
        contestant.steps.append({**timing.ms_per_step, "step": timing.step_ms})


def _return_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc), so a step's RSS rise is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS rise may undercount reused memory
        pass


def profile_methods(names: list[str], suite: tasks.TaskSuite, batch: tuple[Any, Any], args: argparse.Namespace,
                    device: torch.device, n_tasks: int) -> list[dict[str, Any]]:
    """Rows for the floor and ``names``: median ms per phase and per step, memory, or the refusal."""
    contestants, refusals = [], {}
    for name in track([FLOOR, *names], description="building models"):
        try:
            contestants.append(_prepare(name, suite, batch, args, device, n_tasks))
        except LibMTLDefectError as error:  # LibMTL refuses this task count outright
            refusals[name] = str(error)
    for contestant in track(contestants, description="warm-up"):
        for _ in range(args.warmup):
            if contestant.refused is None:
                _take_step(contestant, suite, batch, args, n_tasks)
        contestant.steps.clear()
    for round_index in track(range(args.steps), description="timed rounds"):
        active = [c for c in contestants if c.refused is None]
        shift = round_index % len(active)
        for contestant in active[shift:] + active[:shift]:
            _take_step(contestant, suite, batch, args, n_tasks)
    for contestant in contestants:
        if contestant.refused is None:
            _take_step(contestant, suite, batch, args, n_tasks, measure_memory=True)
    rows = []
    by_name = {c.name: c for c in contestants}
    for name in [FLOOR, *names]:
        c = by_name.get(name)
        if c is None or c.refused is not None:
            rows.append({"method": name, "refused": refusals.get(name) or c.refused})
            continue
        median = {key: statistics.median(s.get(key, 0.0) for s in c.steps) for key in (*STEP_PHASES, "step")}
        state = _state_mb(c)
        rows.append({"method": c.name, "grad_level": args.grad_level if c.method is not None else "parameters",
                     "ms": median, "state_mb": state, "peak_memory_increase_mb": c.step_increase_mb,
                     "peak_memory_mb": state + c.step_increase_mb})
    return rows


def profile_command(args: argparse.Namespace, console: Console) -> int:
    """Run the profile and print the table; exit code 2 on bad input."""
    try:
        names = expand_methods(args.methods)
        check_grad_level(args.grad_level, names)
        check_backbone(args.task, args.backbone)
        if args.steps < 1 or args.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")
        check_batch_size(args.batch_size)
        device = resolve_device(args.device)
        autocast(device, args.amp)
        options = {k: option_value(v) for k, v in parse_assignments(args.task_opt, "--task-opt").items()}
        if args.image_size is not None or "image_size" in tasks.options(args.task):
            options.setdefault("image_size", DEFAULT_IMAGE_SIZE if args.image_size is None else args.image_size)
        args.image_size = options.get("image_size")  # what the suite uses, for the table and the JSON file
        suite = tasks.create(args.task, **options)
        n_tasks = args.n_tasks or suite.n_tasks
        if not 2 <= n_tasks <= suite.n_tasks:
            raise ValueError(f"--tasks must be in [2, {suite.n_tasks}] for {args.task}, got {n_tasks}")
    except INPUT_ERRORS as error:
        return print_error(console, error)
    loader = torch.utils.data.DataLoader(suite.splits()["train"], batch_size=args.batch_size, shuffle=False)
    x, y = next(iter(loader))
    batch = (x.to(device), y.to(device))
    rows = profile_methods(names, suite, batch, args, device, n_tasks)
    ew = next(r for r in rows if r["method"] == "ew")["ms"]["step"]
    floor = next(r for r in rows if r["method"] == FLOOR)["ms"]["step"]
    for row in rows:
        if "ms" in row:
            row["x_ew"], row["x_floor"] = row["ms"]["step"] / ew, row["ms"]["step"] / floor
    _print_table(console, rows, args, suite, n_tasks, device)
    if args.json:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": torch.get_num_threads(),
                   "torch": torch.__version__, "device": str(device),
                   "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
        setup = {"task": args.task, "n_tasks": n_tasks, "batch_size": args.batch_size, "image_size": args.image_size,
                 "backbone": args.backbone, "steps": args.steps, "warmup": args.warmup, "amp": args.amp}
        Path(args.json).write_text(json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=2) + "\n")
    return 0


def _print_table(console: Console, rows: list[dict[str, Any]], args: argparse.Namespace, suite: tasks.TaskSuite,
                 n_tasks: int, device: torch.device) -> None:
    size = f"{args.image_size} px, " if args.image_size is not None else ""
    table = Table(title=f"{args.task}, {n_tasks} tasks, {args.backbone}, {size}batch {args.batch_size}, "
                        f"{device}, median of {args.steps} interleaved steps (ms)")
    for column in ("method", "level", *STEP_PHASES, "step", "x EW", "x floor", "state MB", "step +MB", "peak MB"):
        table.add_column(column, justify="left" if column in ("method", "level") else "right")
    for row in rows:
        if "refused" in row:
            table.add_row(row["method"], "", *[""] * len(STEP_PHASES), "refused", "", "", "", "", "")
            continue
        ms = row["ms"]
        table.add_row(row["method"], row["grad_level"], *[f"{ms[p]:.0f}" for p in STEP_PHASES], f"{ms['step']:.0f}",
                      f"{row['x_ew']:.2f}", f"{row['x_floor']:.2f}", f"{row['state_mb']:.0f}",
                      f"{row['peak_memory_increase_mb']:.0f}", f"{row['peak_memory_mb']:.0f}")
    console.print(table)
