"""Task suites for the multi-task weighting benchmark, behind a registry.

    import tasks
    tasks.available()                          # ['cxr14-synthetic', ...]
    tasks.options("cxr14-synthetic")           # option -> OptionInfo(default, help, required)
    suite = tasks.create("cxr14-synthetic", n_images=3000)
    model = suite.build_model("resnet18")
"""

from tasks import chestmnist, cxr14, cxr14_synthetic  # noqa: F401  (register "chestmnist", "cxr14", "cxr14-synthetic")
from tasks import nyuv2, nyuv2_synthetic  # noqa: F401  (register "nyuv2", "nyuv2-synthetic")
from tasks.base import SPLIT_NAMES, MultiTaskModel, TaskSuite
from tasks.models import BACKBONES, build_encoder
from tasks.multilabel import ImageLabelDataset, MultiLabelModel, MultiLabelSuite
from tasks.registry import OptionInfo, available, create, options, register, run_defaults, suite_class

__all__ = [
    "BACKBONES",
    "SPLIT_NAMES",
    "ImageLabelDataset",
    "MultiLabelModel",
    "MultiLabelSuite",
    "MultiTaskModel",
    "OptionInfo",
    "TaskSuite",
    "available",
    "build_encoder",
    "create",
    "options",
    "register",
    "run_defaults",
    "suite_class",
]
