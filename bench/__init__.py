"""The benchmark harness: run specs, the training engine, timing, MLflow tracking, the CLI.

``bench`` depends on ``methods`` and ``tasks``; neither depends on it.

Importing ``bench`` before ``torch`` turns on PyTorch's transparent-huge-page allocation for
CPU buffers of 2 MB and more (``THP_MEM_ALLOC_ENABLE=1``, read once at torch's first
allocation; set it to 0 to opt out). Gradient methods allocate a fresh 630 MB Jacobian every
step at 14 tasks on ResNet-18; with 4 kB pages its page faults alone cost 0.38 s per step on
a 2-core CPU, with huge pages 0.06 s. Every method, the floor and LibMTL run under the same
setting, so comparisons stay fair; ``bench profile`` records it with the machine.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
