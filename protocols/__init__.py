"""The secure nonlinear kernels. Importing this package registers them with `cipherdm_spu.registry`.

- `protocols.cipherdm_paper`: CipherDM's kernels as its code publishes them (the `cipherdm-paper` set).
- `protocols.cipherdm`: ours (the `cipherdm` set); their coefficients live in `protocols.coefficients`.
- `protocols.norms`: GroupNorm / LayerNorm helpers on the registered rsqrt.
"""
