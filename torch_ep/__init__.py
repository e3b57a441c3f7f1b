"""torch_ep: expert-parallel dispatch/combine for PyTorch Mixture-of-Experts models.

Importing it registers the `torch.ops.ep.*` operators: schemas and CUDA kernels from the
compiled extension, CPU kernels, fake implementations and autograd formulas from Python.
"""
import torch  # noqa: F401  (loads the libraries _C links against)

from . import _C  # noqa: F401  (its import runs the TORCH_LIBRARY registrations)
from . import cpu, low_latency, ops  # noqa: F401  (register CPU kernels, fake and autograd rules)
from . import nn  # noqa: F401  (torch_ep.nn.MoE)
from .buffer import Buffer, DispatchHandle, DispatchLayout, DispatchResult
from .low_latency import LowLatencyDispatchResult, LowLatencyHandle

__all__ = ["Buffer", "DispatchHandle", "DispatchLayout", "DispatchResult", "LowLatencyDispatchResult",
           "LowLatencyHandle"]
