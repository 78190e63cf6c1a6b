"""L2 normalisation shared by the losses, retrieval and the models."""
from __future__ import annotations

import torch

NORM_EPS = 1e-6


def l2_normalize(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """x / max(||x||, eps) over the last dim, the norm taken in at least float32; a zero vector stays zero."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    inverse_norm = torch.rsqrt(wide.square().sum(-1, keepdim=True).clamp_min(eps * eps))
    return (wide * inverse_norm).to(x.dtype)
