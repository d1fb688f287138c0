"""The float64 references every kernel is measured against, and the inputs that probe them.

Shared by the kernel tests (tests/test_cipherdm*.py) and the kernel table (scripts/benchmark_kernels.py,
docs/results/kernels.md); the fits (scripts/fit_kernels.py) minimise the error against the same functions.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def gelu(x):
    """GeLU, exact: x * Phi(x) with the Gaussian CDF Phi (jax.nn.gelu(approximate=False))."""
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def gelu_tanh(x):
    """GeLU's tanh form (jax.nn.gelu(approximate=True))."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


REFERENCES = {
    "silu": lambda x: x * sigmoid(x),
    "mish": lambda x: x * np.tanh(np.logaddexp(x, 0.0)),
    "gelu": gelu,
    "sigmoid": sigmoid,
    "exp": np.exp,
}
#: Inputs far outside a model's activations, where a kernel may wrap the ring or saturate wrongly.
EXTREMES = np.array([-1e4, -1e3, -100.0, -30.0, -20.0, 20.0, 30.0, 100.0, 1e3, 1e4])


def activation_inputs(n_grid: int = 2001) -> np.ndarray:
    """A dense grid on [-20, 20] plus extreme values, as float32."""
    return np.concatenate([np.linspace(-20, 20, n_grid), EXTREMES]).astype(np.float32)


def softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def encoded(x, fraction_bits: int = 18):
    """The value SPU's Io actually shares for x: its fixed-point encoding truncates toward zero (-0.86 units
    becomes 0, -2.6 units -2)."""
    scale = 2.0**fraction_bits
    return np.trunc(np.asarray(x, np.float64) * scale) / scale
