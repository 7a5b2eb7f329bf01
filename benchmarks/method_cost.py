"""The cost of a training step for every method, native and LibMTL's, in the settings README reports.

Runs ``python -m bench profile`` three times in this process: every native and ``libmtl:``
method at 14 tasks and at 3 tasks (parameter-level gradients), and every native method at 14
tasks with feature-level gradients; ResNet-18, 64 px, batch 16 by default. Each profile's
JSON (rows, setup and machine) goes to ``--out``, and a Markdown table of all three to stdout.
On a GPU machine the same command times with CUDA events (``--device cuda``; ``--amp`` for bf16).

    python benchmarks/method_cost.py --steps 10 --out results/method-cost
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.cli import main as bench

SETTINGS = {
    "14 tasks": ["--methods", "all,libmtl:all"],
    "3 tasks": ["--methods", "all,libmtl:all", "--tasks", "3"],
    "14 tasks, features": ["--methods", "all", "--grad-level", "features"],
}


def markdown(profiles: dict[str, dict]) -> str:
    """One table: method x setting, with ms/step, x EW and x floor."""
    lines = ["| setting | method | ms/step | x EW | x floor | peak MB |", "| --- | --- | --- | --- | --- | --- |"]
    for setting, profile in profiles.items():
        for row in profile["rows"]:
            if "refused" in row:
                lines.append(f"| {setting} | {row['method']} | refused | | | |")
            else:
                lines.append(
                    f"| {setting} | {row['method']} | {row['ms']['step']:.0f} | {row['x_ew']:.2f} | "
                    f"{row['x_floor']:.2f} | {row['peak_memory_mb']:.0f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10")
    parser.add_argument("--warmup", default="2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--out", default="results/method-cost")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--steps", args.steps, "--warmup", args.warmup, *(["--device", args.device] if args.device else [])]
    common += ["--amp"] if args.amp else []
    profiles = {}
    for setting, options in SETTINGS.items():
        path = out / (setting.replace(", ", "-").replace(" ", "-") + ".json")
        if bench(["profile", *options, *common, "--json", str(path)]) != 0:
            raise SystemExit(f"profile {setting} failed")
        profiles[setting] = json.loads(path.read_text())
    print(markdown(profiles))


if __name__ == "__main__":
    main()
