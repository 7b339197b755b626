"""What "the same features" means across batches, thread counts and processors.

A frozen backbone's output can differ in its last bits with the batch a sample meets:
PyTorch and oneDNN pick convolution and matmul kernels by batch size, thread count and
instruction set (AVX-512 machines differ from AVX2 ones), and text is padded to the
batch's longest caption. The cache stores fp16, so such a difference shows as one unit
in the last place (ULP) of a few values. Sharded builds, resumed builds and re-encoded
samples therefore promise features **equal to within fp16 rounding**: at most
:data:`FP16_ULPS` units in the last place of the larger value, per value. Everything
else a cache holds (ids, measurements, input keys, rejects) is compared exactly.

Trained weights are byte-identical across reruns, resumes and ``--replace`` on one
machine with one thread setting, because they read the same cached features; see
docs/reliability.md for the full list.
"""

from __future__ import annotations

import numpy as np
import torch

FP16_ULPS = 2  # one ULP from the kernel choice, one more from re-rounding on the way to fp16
_FP16_MIN_EXPONENT = -14  # below 2**-14 fp16 is subnormal, with a fixed ULP of 2**-24


def fp16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The fp16 unit in the last place at each value of ``x`` (float32 result)."""
    _, exponent = torch.frexp(x.float().abs())  # |x| = m * 2**e, m in [0.5, 1)
    exponent = torch.clamp(exponent - 1, min=_FP16_MIN_EXPONENT)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 10)


def feature_mismatch(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> str | None:
    """None if ``a`` and ``b`` hold the same features to within fp16 rounding, else why not."""
    # torch.tensor copies: cache bytes come as read-only arrays, which as_tensor would only warn about.
    a, b = (x if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x)) for x in (a, b))
    if a.shape != b.shape:
        return f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtypes differ: {a.dtype} vs {b.dtype}"
    a32, b32 = a.float(), b.float()
    if not torch.equal(torch.isfinite(a32), torch.isfinite(b32)):
        return "non-finite values differ"
    diff = (a32 - b32).abs()
    allowed = FP16_ULPS * fp16_ulp(torch.maximum(a32.abs(), b32.abs()))
    over = torch.isfinite(a32) & (diff > allowed)
    if bool(over.any()):
        worst = int(torch.argmax(torch.where(over, diff / allowed, torch.zeros_like(diff))))
        return (f"{int(over.sum())} of {a.numel()} values differ by more than {FP16_ULPS} fp16 ULPs "
                f"(worst {float(diff.flatten()[worst]):.3g} at {float(a32.flatten()[worst]):.4g})")
    return None


def same_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are the same features to within fp16 rounding."""
    return feature_mismatch(a, b) is None
