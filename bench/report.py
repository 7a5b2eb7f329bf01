"""``python -m bench report``: compare methods from an MLflow store or a results CSV.

Writes ``report.md``, a self-contained ``report.html``, ``stats.json``, LaTeX tables and PNG
figures (see :mod:`bench.report_build`); ``--export-csv`` also writes the runs in the long
format ``method,dataset,seed,metric,value`` that ``--from`` reads.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.credentials import masked
from bench.errors import print_error


def add_report_parser(commands: Any) -> None:
    """Register the ``report`` subcommand on the ``add_subparsers`` object ``commands``."""
    report = commands.add_parser(
        "report",
        help="compare methods: tables, significance tests, CD diagram, cost, from MLflow or a CSV",
        description="Compare the methods of finished runs (an MLflow store) or of a long-format CSV "
        "(method,dataset,seed,metric,value): mean ± std tables, per-task table, Delta_m%%, Friedman with "
        "Iman-Davenport, Nemenyi CD diagram, Wilcoxon-Holm against a reference, paired bootstrap of the "
        "mean AUROC, cost table and training curves.",
    )
    source = report.add_mutually_exclusive_group()
    source.add_argument(
        "--from", dest="from_csv", metavar="CSV", help="read a long-format results CSV instead of MLflow"
    )
    source.add_argument(
        "--tracking-uri",
        dest="tracking_uri",
        help="MLflow store (default sqlite:///<results>/mlflow.db; MLFLOW_TRACKING_URI honoured)",
    )
    report.add_argument("--results", default="results", help="results directory of `bench run` (default results/)")
    report.add_argument(
        "--experiment", action="append", help="MLflow experiment (repeatable; default every mtl-bench/* experiment)"
    )
    report.add_argument(
        "--metric",
        help="metric to compare by: a key (mean_auroc) or a per-task family (auroc); default: the primary metric's family",
    )
    report.add_argument(
        "--reference",
        help="method every other is tested against (default ew when it ran, else the first method; "
        "ew is always a reference too)",
    )
    report.add_argument("--out", help="report directory (default <results>/report)")
    report.add_argument(
        "--export-csv", dest="export_csv", metavar="CSV", help="also write the MLflow runs as a long-format CSV"
    )
    report.add_argument(
        "--minimize",
        default="",
        help="comma list of metrics (keys or families) that are better when lower, for data sets that are no task suite",
    )
    report.add_argument(
        "--alpha", type=float, default=0.05, help="significance level of the Nemenyi critical difference (default 0.05)"
    )
    report.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="resamples of the paired bootstrap of mean AUROC; 0 skips it (default 1000)",
    )


def _tracking_uri(args: argparse.Namespace) -> str:
    return (
        args.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(Path(args.results) / 'mlflow.db').resolve()}"
    )


def report_command(args: argparse.Namespace, console: Console, argv: Sequence[str]) -> int:
    """Run ``bench report`` with parsed arguments (``argv``: the command line, quoted in the report).

    Returns the exit code: 0, or 2 for bad input.
    """
    from bench.report_build import ReportOptions, build_report  # heavy imports only when reporting
    from bench.results_io import NoResultsError, load_mlflow, read_long_csv, write_long_csv

    if not 0.0 < args.alpha < 1.0:
        console.print(f"[red]error:[/] --alpha must be in (0, 1), got {args.alpha}")
        return 2
    if args.bootstrap < 0:
        console.print(f"[red]error:[/] --bootstrap must be 0 (off) or a number of resamples, got {args.bootstrap}")
        return 2
    if args.from_csv and args.export_csv:
        console.print("[red]error:[/] --export-csv writes MLflow runs as a CSV; with --from the input is a CSV already")
        return 2
    tracking_uri = None if args.from_csv else _tracking_uri(args)
    options = ReportOptions(
        out=Path(args.out) if args.out else Path(args.results) / "report",
        metric=args.metric,
        reference=args.reference,
        alpha=args.alpha,
        bootstrap_resamples=args.bootstrap,
        minimize=tuple(name.strip() for name in args.minimize.split(",") if name.strip()),
        command=shlex.join(["python", "-m", "bench", *map(masked, argv)]),
    )
    try:
        results = read_long_csv(args.from_csv) if args.from_csv else load_mlflow(tracking_uri, args.experiment)
        if args.export_csv:
            console.print(f"runs written to {write_long_csv(results, args.export_csv)}")
        report = build_report(results, options, tracking_uri)
    except NoResultsError as error:
        console.print(f"[red]no results:[/] {error}")
        return 2
    except (ValueError, FileNotFoundError) as error:
        return print_error(console, error)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"reference method of the tests: {report.stats['reference']} ({report.stats['reference_reason']})")
    console.print(
        f"report: {report.directory / 'report.md'} and report.html; statistics: stats.json; {len(report.files)} files in {report.directory}"
    )
    return 0
