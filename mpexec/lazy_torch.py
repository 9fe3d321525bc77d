"""torch, imported when first used.

`import torch` takes about 1.3 s. A merge on the CPU whose tensors all go through mpexec.kernels (the
task-arithmetic family on bfloat16 or float32 models) never touches it, so mpexec's modules name torch
through this stand-in, which imports the real module at the first attribute lookup.
"""

from __future__ import annotations

import importlib


class _LazyTorch:
    def __getattr__(self, name: str):
        return getattr(importlib.import_module("torch"), name)


torch = _LazyTorch()
