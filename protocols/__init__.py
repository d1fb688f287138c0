"""The secure nonlinear kernels. Importing this package registers them with `cipherdm_spu.registry`.

- `protocols.cipherdm_paper`: CipherDM's kernels as its code publishes them (the `cipherdm-paper` set).
- `protocols.cipherdm`: ours (the `cipherdm` set); their coefficients live in `protocols.coefficients`.
- `protocols.norms`: GroupNorm / LayerNorm on the registered rsqrt.
The vanilla kernels (`jax`, used by the `spu` and `spu-pade` sets) are registered by `cipherdm_spu.ops`.
"""

from . import cipherdm, cipherdm_paper  # noqa: F401  (register on import)
from .norms import group_norm, layer_norm

__all__ = ["group_norm", "layer_norm"]
