"""The one FLOP counter of the package.

``count_flops(fn)`` runs ``fn()`` under ``torch.utils.flop_counter.FlopCounterMode`` (matrix
multiplications and convolutions; elementwise operations are not counted), without gradients and
with attention on the math backend, so that it decomposes into counted matmuls on every device
(the fused CPU kernel has no FLOP formula; the count equals that of the fused CUDA kernels: two
batched matmuls per attention). ``fn`` may run on the ``meta`` device: the count is the same as a
real run's, so a 12B transformer never has to be loaded to be costed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return float(counter.get_total_flops())


__all__ = ["count_flops"]
