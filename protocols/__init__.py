"""The secure kernels, one module per family; importing this package registers them with `cipherdm_spu.registry`.

- `vanilla`: each op as plain JAX (kernel name ``jax``): SPU's own kernels, the `spu` and `spu-pade` sets.
- `cipherdm_paper`: CipherDM's kernels as its code publishes them (the `cipherdm-paper` set).
- `cipherdm`: ours (the `cipherdm` set); their coefficients are `coefficients`, fitted by scripts/fit_kernels.py.
- `reference`: the float64 functions every kernel is measured against (docs/results/kernels.md).
The package is imported by `cipherdm_spu` itself, right after the registry, so every kernel is registered
before any protocol set is resolved.
"""

from . import cipherdm, cipherdm_paper, vanilla  # noqa: F401  (register on import)
