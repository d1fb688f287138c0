"""cipherdm-spu: diffusion sampling under three-party secure computation on SecretFlow SPU.

The public API: the secure session (`SecureSession`), the kernel registry (`registry`, `ops`,
`register_kernel`, `use_protocol`) and the cost reports (`RunStats`). The imports below go up the layers
(README, "Layout"): core, then the built-in kernels (which register with the registry), then the runtime. First of
all, before anything loads SPU, OpenMP's thread limit for SPU's matrix products (`spu_threads`).
"""

from . import spu_threads  # noqa: F401  (first: it limits OpenMP's threads before SPU's library loads)
from . import ops, registry
from . import protocols  # noqa: F401  (registers the built-in kernels)
from ._version import __version__
from .errors import InputError, ProtocolError, SessionError
from .profiling import KernelStats, RunStats
from .registry import ProtocolSet, register_kernel, register_protocol_set, use_protocol
from .session import Public, Secret, SecureSession

__all__ = [
    "InputError",
    "KernelStats",
    "ProtocolError",
    "ProtocolSet",
    "Public",
    "RunStats",
    "Secret",
    "SecureSession",
    "SessionError",
    "__version__",
    "ops",
    "register_kernel",
    "register_protocol_set",
    "registry",
    "use_protocol",
]
