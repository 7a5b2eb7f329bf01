"""``python -m bench profile``: the cost of one training step per method, beside the floor and LibMTL.

Every method trains the same freshly seeded model on the same fixed batch (so data loading is
not measured) for ``--warmup`` steps, then ``--steps`` timed steps through
:func:`bench.step.training_step`, the very step the training engine runs. Each step is timed
by phase with :class:`bench.timing.PhaseTimer` (CUDA events on a GPU, the monotonic clock on
a CPU); the table shows medians over steps. Methods with an epoch-level schedule are first
moved past their first epoch (GradNorm weighs by gradients only from its second epoch).

Two ratios, measured in the same process:

- ``x EW``: a method's median step over equal weighting's;
- ``x floor``: over the floor, the least any exact per-task-gradient method must do: the
  forward pass, a plain loop of one ``torch.autograd.grad`` per task over the shared
  parameters, and the optimizer step (the floor does not even add the T gradients up).

Peak memory is the allocator's peak on a GPU and the resident set size on a CPU, sampled at
every phase boundary, with its increase over the method's start.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import methods
import tasks
from bench.spec import option_value, parse_assignments
from bench.step import GRAD_LEVELS, autocast, seed_everything, supplied_hparams, training_step
from bench.timing import STEP_PHASES, PhaseTimer
from methods.base import EpochStats
from methods.libmtl import LIBMTL_METHODS, LibMTLDefectError

FLOOR = "floor"


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
    profile.add_argument("--image-size", type=int, default=64, dest="image_size", help="task option (default 64)")
    profile.add_argument("--backbone", default="resnet18")
    profile.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    profile.add_argument("--amp", action="store_true", help="bf16 autocast of the forward pass (CUDA only)")
    profile.add_argument("--task-opt", action="append", default=[], dest="task_opt", metavar="KEY=VALUE")
    profile.add_argument("--json", help="also write the rows and the machine to this JSON file")


def expand_methods(text: str) -> list[str]:
    """``all`` -> every native method; ``libmtl:all`` -> every LibMTL method; names kept in order."""
    names: list[str] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item == "all":
            names += methods.available()
        elif item == "libmtl:all":
            names += [f"libmtl:{name}" for name in LIBMTL_METHODS]
        else:
            names.append(item)
    unknown = [n for n in names if n not in methods.available(include_libmtl=True)]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; see python -m bench list")
    return list(dict.fromkeys(["ew", *names]))


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


def profile_method(name: str, suite: tasks.TaskSuite, batch: tuple[Any, Any], args: argparse.Namespace,
                   device: torch.device, n_tasks: int) -> dict[str, Any]:
    """Median ms per phase and per step, and peak memory, of ``name`` (or the floor)."""
    seed_everything(0)
    model = suite.build_model(args.backbone).to(device)
    shared = model.shared_parameters()
    method = None
    if name != FLOOR:
        method = methods.create(name, n_tasks, **supplied_hparams({}, suite, name, seed=0, n_tasks=n_tasks)).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *(method.parameters() if method else [])], lr=1e-4)
    x, y = batch
    timer = PhaseTimer(device)
    if method is not None:  # one epoch of one step: past the first-epoch schedules (GradNorm)
        _, losses, _ = training_step(model, suite, method, optimizer, x, y, shared, timer,
                                     grad_level=args.grad_level, amp=args.amp, n_tasks=n_tasks)
        method.epoch_end(EpochStats(train_loss=losses.cpu(), train_accuracy=torch.full((n_tasks,), 0.5)))
        timer.epoch()
    per_step: list[dict[str, float]] = []
    peak = increase = 0.0
    for step in range(args.warmup + args.steps):
        if method is None:
            _floor_step(model, suite, optimizer, x, y, shared, timer, n_tasks)
        else:
            training_step(model, suite, method, optimizer, x, y, shared, timer,
                          grad_level=args.grad_level, amp=args.amp, n_tasks=n_tasks)
        timing = timer.epoch()
        if step >= args.warmup:
            per_step.append({**timing.ms_per_step, "step": timing.step_ms})
            peak, increase = max(peak, timing.peak_memory_mb), max(increase, timing.peak_memory_increase_mb)
    median = {key: statistics.median(s.get(key, 0.0) for s in per_step) for key in (*STEP_PHASES, "step")}
    return {"method": name, "grad_level": args.grad_level if method is not None else "parameters",
            "ms": median, "peak_memory_mb": peak, "peak_memory_increase_mb": increase}


def profile_command(args: argparse.Namespace, console: Console) -> int:
    """Run the profile and print the table; exit code 2 on bad input."""
    try:
        names = expand_methods(args.methods)
        options = {"image_size": args.image_size, **{k: option_value(v) for k, v in parse_assignments(args.task_opt, "--task-opt").items()}}
        suite = tasks.create(args.task, **options)
        n_tasks = args.n_tasks or suite.n_tasks
        if not 2 <= n_tasks <= suite.n_tasks:
            raise ValueError(f"--tasks must be in [2, {suite.n_tasks}] for {args.task}, got {n_tasks}")
        if args.steps < 1 or args.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        autocast(device, args.amp)
    except (ValueError, TypeError, FileNotFoundError) as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    loader = torch.utils.data.DataLoader(suite.splits()["train"], batch_size=args.batch_size, shuffle=False)
    x, y = next(iter(loader))
    batch = (x.to(device), y.to(device))
    rows = []
    for name in [FLOOR, *names]:
        console.print(f"profiling {name} ...")
        try:
            rows.append(profile_method(name, suite, batch, args, device, n_tasks))
        except LibMTLDefectError as error:
            rows.append({"method": name, "refused": str(error)})
    ew = next(r for r in rows if r["method"] == "ew")["ms"]["step"]
    floor = next(r for r in rows if r["method"] == FLOOR)["ms"]["step"]
    for row in rows:
        if "ms" in row:
            row["x_ew"], row["x_floor"] = row["ms"]["step"] / ew, row["ms"]["step"] / floor
    _print_table(console, rows, args, suite, n_tasks, device)
    if args.json:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": torch.get_num_threads(),
                   "torch": torch.__version__, "device": str(device),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
        setup = {"task": args.task, "n_tasks": n_tasks, "batch_size": args.batch_size, "image_size": args.image_size,
                 "backbone": args.backbone, "steps": args.steps, "warmup": args.warmup, "amp": args.amp}
        Path(args.json).write_text(json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=2) + "\n")
    return 0


def _print_table(console: Console, rows: list[dict[str, Any]], args: argparse.Namespace, suite: tasks.TaskSuite,
                 n_tasks: int, device: torch.device) -> None:
    table = Table(title=f"{args.task}, {n_tasks} tasks, {args.backbone}, {args.image_size} px, batch {args.batch_size}, "
                        f"{device}, median of {args.steps} steps (ms)")
    for column in ("method", "level", *STEP_PHASES, "step", "x EW", "x floor", "peak MB", "+MB"):
        table.add_column(column, justify="left" if column in ("method", "level") else "right")
    for row in rows:
        if "refused" in row:
            table.add_row(row["method"], "", *[""] * len(STEP_PHASES), "refused", "", "", "", "")
            continue
        ms = row["ms"]
        table.add_row(row["method"], row["grad_level"], *[f"{ms[p]:.0f}" for p in STEP_PHASES], f"{ms['step']:.0f}",
                      f"{row['x_ew']:.2f}", f"{row['x_floor']:.2f}", f"{row['peak_memory_mb']:.0f}",
                      f"{row['peak_memory_increase_mb']:.0f}")
    console.print(table)
