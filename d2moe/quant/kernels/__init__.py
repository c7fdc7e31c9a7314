"""Expert compute from packed MWQ bytes: a fast CPU path and its torch reference (same signature)."""

from d2moe.quant.kernels.cpu import BoundExpert, CpuKernel, expert_ffn, load_kernel
from d2moe.quant.kernels.reference import expert_ffn_reference

__all__ = ["BoundExpert", "CpuKernel", "expert_ffn", "expert_ffn_reference", "load_kernel"]
