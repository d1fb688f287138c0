"""cipherdm-spu: diffusion sampling under three-party secure computation on SecretFlow SPU.

Runtime core: the secure session (`SecureSession`), the intrinsic registry (`registry`, `ops`) and
the cost reports (`profiling`).
"""

from . import ops, registry
from .profiling import KernelStats, RunStats
from .registry import ProtocolError, ProtocolSet, register_kernel, register_protocol_set, use_protocol
from .session import InputError, Public, Secret, SecureSession, SessionError

__version__ = "0.1.0"

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
    "ops",
    "register_kernel",
    "register_protocol_set",
    "registry",
    "use_protocol",
]
