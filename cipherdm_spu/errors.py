"""Every exception the project raises, in one module at the bottom of the layers (it imports nothing).

Each names what was refused; the modules that raise them re-export nothing else. Built-in bases say how a
caller may treat them: ValueError for a bad input, configuration or choice; RuntimeError for a run that failed.
"""


class ProtocolError(ValueError):
    """A protocol set, kernel, override or SPU option that does not exist or does not fit (`registry`)."""


class ConfigError(ValueError):
    """A model config that is malformed or asks for something the ports do not implement (`models.config`)."""


class SchedulerConfigError(ValueError):
    """A scheduler config option this port does not support, or a bad value (`models.schedulers`)."""


class StableDiffusionDirError(ValueError):
    """The model directory is not a usable diffusers Stable Diffusion layout (`stable_diffusion`)."""


class ProfileParseError(RuntimeError):
    """The SPU log did not hold the lines one run should have produced (`profiling`)."""


class SessionError(RuntimeError):
    """A secure run failed inside SPU, or the session was used after close() (`session`)."""


class InputError(ValueError):
    """An input was refused before anything was shared: NaN/inf, an unsupported dtype, untraceable (`session`)."""


class PrivatePathError(ValueError):
    """A folder or file that someone other than this user and root could change, through it or its path, or that is
    not what it should be (a directory, a regular file) (`private_dir`)."""


class CompileCacheError(ValueError):
    """The compile cache's directory, an entry, or something on its path could be changed by someone other than this
    user and root, or is not a directory (`compile_cache`)."""


class ClusterConfigError(ValueError):
    """The cluster config is missing something or has a bad value; the message names it (`cluster_config`)."""


class ClusterError(SessionError):
    """A party is unreachable, refuses, disagrees with the client, or failed during a run (`client`)."""


class PartyError(RuntimeError):
    """A request the party refuses (wrong session, busy, a job its policy forbids), sent back to the client (`party`)."""


class UsageError(ValueError):
    """Bad command-line input: reported with the script's usage and exit status 2 (`sampling_cli`, `sd_cli`)."""


class MessageError(ValueError):
    """A control message that does not match its declared type (`messages`)."""


class IrAuditError(ValueError):
    """Compiled IR that cannot be checked, or (from `ir_audit.audit`) that declassifies something: never run it."""


class LinkEmulatorError(RuntimeError):
    """The link emulator cannot run here (a party not on this machine, a bad link, relays that do not start) (`netem`)."""


class ProgramError(ValueError):
    """A traced program that SPU 0.9.5 would compute with other constants than its own (`public_constants`)."""
