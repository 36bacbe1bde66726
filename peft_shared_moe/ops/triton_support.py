"""The error of an explicit `backend="triton"` that cannot compute the exact result.

Kept apart from `triton_experts` (which imports triton) so that the same error, with the same
advice, is raised when triton itself is missing.
"""

from __future__ import annotations


class TritonBackendError(RuntimeError):
    """`backend="triton"` was asked for where the fused kernels would compute something else.

    The message names every reason (autograd needed, a layout or gate the kernels do not implement,
    no CUDA device, triton missing, ...) and what to do instead; `backend="auto"` falls back to the
    exact torch path in each of these cases instead of raising.
    """

    @classmethod
    def from_reasons(cls, reasons: list[str]) -> "TritonBackendError":
        return cls("backend='triton' cannot compute this call exactly: " + "; ".join(reasons))
