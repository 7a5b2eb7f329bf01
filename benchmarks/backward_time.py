"""Time one ``backward`` per method, native and LibMTL's, in one process.

ResNet-18 encoder (1-channel input) with one linear head per task, a fixed random batch; each
method's ``backward`` is timed after warm-up as the median of a few repetitions, with the
forward pass outside the timing. Ratios are to native EW measured in the same run.

    python benchmarks/backward_time.py --tasks 14 --image-size 64 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import methods
from methods.libmtl import LIBMTL_METHODS, LibMTLDefectError
from tasks.models import build_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=14)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    encoder, features = build_encoder("resnet18", in_channels=1)
    heads = torch.nn.ModuleList(torch.nn.Linear(features, 1) for _ in range(args.tasks))
    x = torch.randn(args.batch_size, 1, args.image_size, args.image_size)
    y = (torch.rand(args.batch_size, args.tasks) < 0.3).float()
    shared = list(encoder.parameters())

    def losses() -> torch.Tensor:
        out = encoder(x)
        logits = torch.cat([head(out) for head in heads], dim=1)
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)

    def time_backward(name: str) -> float:
        method = methods.create(name, n_tasks=args.tasks)
        times = []
        for _ in range(args.repeats + 1):  # the first call warms up
            for p in [*encoder.parameters(), *heads.parameters()]:
                p.grad = None
            current = losses()
            random.seed(0)
            started = time.perf_counter()
            method.backward(current, shared)
            times.append(time.perf_counter() - started)
            # gradnorm leaves its EW epoch; deepchest needs an accuracy per task.
            method.epoch_end({"train_loss": current.detach(), "train_accuracy": torch.linspace(0.5, 0.9, args.tasks)})
        return statistics.median(times[1:])

    names = methods.available()
    rows = []
    ew = time_backward("ew")
    for name in names:
        native = ew if name == "ew" else time_backward(name)
        reference = "-"
        if name in LIBMTL_METHODS:
            try:
                reference = f"{time_backward('libmtl:' + name):.3f}"
            except LibMTLDefectError as error:
                reference = "refused: " + str(error).split(";")[0].split(": ", 1)[1]
        rows.append((name, native, reference))
    print(f"ResNet-18, {args.tasks} tasks, {args.image_size} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'method':<10} {'native s':>9} {'x EW':>6}  libmtl s")
    for name, native, reference in rows:
        print(f"{name:<10} {native:9.3f} {native / ew:6.2f}  {reference}")


if __name__ == "__main__":
    main()
