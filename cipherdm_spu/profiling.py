"""Cost reports parsed from SPU's own profiler log.

SPU 0.9.5 exposes no link statistics to Python; with ``enable_pphlo_profile`` / ``enable_hal_profile``
each party logs, after every run, one line per op and a ``Link details`` total. In one process the
three parties' lines interleave and carry no party id, so the parties profile at different levels:

* party 0: pphlo and HAL (+ MPC) lines, party 1: pphlo lines only, party 2: HAL (+ MPC) lines only.

Each level's lines add up to that party's link total (all traffic happens inside some op; HAL and MPC
each count it once). With S the sum of the three ``Link details`` lines, A the sum of pphlo lines
(parties 0+1) and B half the sum of HAL+MPC lines (parties 0+2)::

    s0 = A + B - S,   s1 = S - B,   s2 = S - A

and every recovered value must equal one of the three logged totals, which is checked.
The per-op breakdown (``kernels``) is taken from the pphlo lines of parties 0 and 1, averaged.

Compute per party (``cpu_seconds_per_party``, ``busy_seconds_per_party``) is measured only where each party
is a process of its own (the cluster: its SPU worker's process CPU time and the wall time it spent in the
run); in one process the three parties' threads share one CPU clock, so an embedded run leaves both empty.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional

import spu.libspu as libspu

from . import private_dir
from .errors import ProfileParseError

#: (enable_pphlo_profile, enable_hal_profile) per party; see the module docstring.
PARTY_PROFILE_FLAGS = [(True, True), (True, False), (False, True)]

_OP_LINE = re.compile(
    r"- (?P<name>[^,]+?), executed (?P<calls>\d+) times, duration (?P<secs>[0-9.eE+-]+)s, "
    r"send bytes (?P<sb>\d+) recv bytes (?P<rb>\d+), send actions (?P<sa>\d+), recv actions (?P<ra>\d+)"
)
_LINK_LINE = re.compile(
    r"Link details: total send bytes (?P<sb>\d+), recv bytes (?P<rb>\d+), "
    r"send actions (?P<sa>\d+), recv actions (?P<ra>\d+)"
)


@dataclasses.dataclass
class KernelStats:
    """Cost of one pphlo op over a run, per party (mean of the parties that report it)."""

    calls: int
    seconds: float
    bytes_sent: float
    send_actions: float


@dataclasses.dataclass
class RunStats:
    """Cost of one secure run. Bytes and actions are exact, from SPU's link counters."""

    seconds: float
    bytes_sent: int
    bytes_recv: int
    bytes_sent_per_party: List[int]
    bytes_recv_per_party: List[int]
    send_actions: int  # the most of any one party: the proxy for communication rounds
    send_actions_per_party: List[int]
    kernels: Dict[str, KernelStats]
    #: each party's CPU seconds in the run (its SPU worker process, every thread); empty where not measured
    cpu_seconds_per_party: List[float] = dataclasses.field(default_factory=list)
    #: each party's wall seconds from the run's start to its end in that party; empty where not measured
    busy_seconds_per_party: List[float] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def zero(cls) -> "RunStats":
        return cls(0.0, 0, 0, [0, 0, 0], [0, 0, 0], 0, [0, 0, 0], {})

    def __add__(self, other: "RunStats") -> "RunStats":
        kernels: Dict[str, KernelStats] = {}
        for stats in (self, other):
            for op, k in stats.kernels.items():
                _accumulate(kernels, op, k.calls, k.seconds, k.bytes_sent, k.send_actions)
        add = lambda a, b: [x + y for x, y in zip(a, b)]  # noqa: E731
        # empty (not measured) adds as zero, so that sums can start from zero(); a measured run has all three
        measured = lambda a, b: add(a, b) if a and b else list(a or b)  # noqa: E731
        return RunStats(
            self.seconds + other.seconds,
            self.bytes_sent + other.bytes_sent,
            self.bytes_recv + other.bytes_recv,
            add(self.bytes_sent_per_party, other.bytes_sent_per_party),
            add(self.bytes_recv_per_party, other.bytes_recv_per_party),
            self.send_actions + other.send_actions,
            add(self.send_actions_per_party, other.send_actions_per_party),
            kernels,
            measured(self.cpu_seconds_per_party, other.cpu_seconds_per_party),
            measured(self.busy_seconds_per_party, other.busy_seconds_per_party),
        )


def _accumulate(kernels: Dict[str, KernelStats], op: str, calls: int, seconds: float, bytes_sent: float,
                send_actions: float) -> None:
    """Add one report's cost of ``op`` to ``kernels``."""
    k = kernels.setdefault(op, KernelStats(0, 0.0, 0.0, 0.0))
    k.calls += calls
    k.seconds += seconds
    k.bytes_sent += bytes_sent
    k.send_actions += send_actions


def _pphlo_ops(text: str):
    """(op without the ``pphlo.`` prefix, its line's match) for every pphlo op line of a profile, ``free`` left out."""
    for m in _OP_LINE.finditer(text):
        name = m.group("name")
        if name.startswith("pphlo.") and name != "pphlo.free":
            yield name[len("pphlo."):], m


def _per_party(link_totals: List[int], hlo_sum: int, lower_sum: int, what: str) -> List[int]:
    total = sum(link_totals)
    if lower_sum % 2:
        raise ProfileParseError(f"HAL and MPC {what} do not add up to twice a total ({lower_sum})")
    b = lower_sum // 2
    parties = [hlo_sum + b - total, total - b, total - hlo_sum]
    if sorted(parties) != sorted(link_totals):
        raise ProfileParseError(
            f"cannot attribute {what} to parties: levels give {parties}, link totals are {link_totals}"
        )
    return parties


def parse_run(text: str, seconds: float) -> RunStats:
    """RunStats from the log lines written by one run of the three parties."""
    links = [m for m in _LINK_LINE.finditer(text)]
    if len(links) != 3:
        raise ProfileParseError(f"expected 3 'Link details' lines for one run, found {len(links)}")
    hlo = {"sb": 0, "rb": 0, "sa": 0}
    lower = {"sb": 0, "rb": 0, "sa": 0}
    kernels: Dict[str, KernelStats] = {}
    for m in _OP_LINE.finditer(text):
        bucket = hlo if m.group("name").startswith("pphlo.") else lower
        for key in bucket:
            bucket[key] += int(m.group(key))
    for op, m in _pphlo_ops(text):  # two parties report pphlo lines: halves make a per-party mean
        _accumulate(kernels, op, int(m.group("calls")), float(m.group("secs")) / 2, int(m.group("sb")) / 2,
                    int(m.group("sa")) / 2)
    for k in kernels.values():
        k.calls //= 2
    totals = {key: [int(m.group(key)) for m in links] for key in ("sb", "rb", "sa")}
    sent = _per_party(totals["sb"], hlo["sb"], lower["sb"], "bytes sent")
    recv = _per_party(totals["rb"], hlo["rb"], lower["rb"], "bytes received")
    actions = _per_party(totals["sa"], hlo["sa"], lower["sa"], "send actions")
    return RunStats(
        seconds=seconds,
        bytes_sent=sum(sent),
        bytes_recv=sum(recv),
        bytes_sent_per_party=sent,
        bytes_recv_per_party=recv,
        send_actions=max(actions),
        send_actions_per_party=actions,
        kernels=dict(sorted(kernels.items(), key=lambda kv: -kv[1].bytes_sent)),
    )


def parse_party_run(text: str) -> dict:
    """One party's own cost of one run, from its own log (a party in its own process, pphlo profile on).

    Returns plain numbers (it travels over the control channel): link totals and per-op costs.
    """
    links = list(_LINK_LINE.finditer(text))
    if len(links) != 1:
        raise ProfileParseError(f"expected 1 'Link details' line in a party's run, found {len(links)}")
    kernels: Dict[str, list] = {}
    for op, m in _pphlo_ops(text):
        k = kernels.setdefault(op, [0, 0.0, 0, 0])
        k[0] += int(m.group("calls"))
        k[1] += float(m.group("secs"))
        k[2] += int(m.group("sb"))
        k[3] += int(m.group("sa"))
    link = links[0]
    return {
        "bytes_sent": int(link.group("sb")), "bytes_recv": int(link.group("rb")),
        "send_actions": int(link.group("sa")), "kernels": kernels,
    }


def combine_party_runs(parties: List[dict], seconds: float) -> RunStats:
    """RunStats from the three parties' `parse_party_run` reports (kernels: the mean over parties), with each
    party's ``cpu_seconds`` and ``seconds`` (busy wall) where its report has them."""
    kernels: Dict[str, KernelStats] = {}
    n = len(parties)
    for report in parties:
        for op, (calls, secs, sent, actions) in report["kernels"].items():
            _accumulate(kernels, op, calls, secs / n, sent / n, actions / n)
    for k in kernels.values():  # every party reports every call
        k.calls //= n
    sent = [r["bytes_sent"] for r in parties]
    recv = [r["bytes_recv"] for r in parties]
    actions = [r["send_actions"] for r in parties]
    return RunStats(
        seconds=seconds, bytes_sent=sum(sent), bytes_recv=sum(recv), bytes_sent_per_party=sent,
        bytes_recv_per_party=recv, send_actions=max(actions), send_actions_per_party=actions,
        kernels=dict(sorted(kernels.items(), key=lambda kv: -kv[1].bytes_sent)),
        cpu_seconds_per_party=[r["cpu_seconds"] for r in parties] if all("cpu_seconds" in r for r in parties) else [],
        busy_seconds_per_party=[r["seconds"] for r in parties] if all("seconds" in r for r in parties) else [],
    )


def private_log_path(path: os.PathLike) -> Path:
    """The real path (`private_dir.Folder.path`) of log file ``path``, made a file of this user's alone in a private
    folder (`private_dir.create_file`): SPU opens its log by path, and a log says what each run did.
    PrivatePathError where someone else could change the folder or one on its path."""
    path = Path(path).absolute()
    with private_dir.opened_folder(path.parent) as folder:
        os.close(private_dir.create_file(folder, path.name))
        return folder.path / path.name


def _file_id(path: Path) -> tuple:
    info = os.stat(path, follow_symlinks=False)
    return info.st_dev, info.st_ino


class SpuLog:
    """SPU's process-wide log, sent to a file; hands out the text each run appended.

    SPU's logger is global to the process, so there is one SpuLog; sessions run one at a time.
    """

    _instance: Optional["SpuLog"] = None
    _lock = threading.Lock()

    def __init__(self, path: Path):
        """``path``: a real path, as `private_log_path` returns."""
        self.path = path
        self.file = _file_id(path)  # SPU writes this file; a later one at the path (the log moved aside) is another
        opts = libspu.logging.LogOptions()
        opts.enable_console_logger = False
        opts.system_log_path = str(self.path)
        opts.max_log_file_size = 1 << 40  # no rotation: offsets must stay valid
        libspu.logging.setup_logging(opts)

    @classmethod
    def get(cls, path: Optional[os.PathLike] = None) -> "SpuLog":
        """The process's SpuLog, redirected to ``path`` if one is given."""
        with cls._lock:
            if path is not None:
                path = private_log_path(path)
                if cls._instance is None or (cls._instance.path, cls._instance.file) != (path, _file_id(path)):
                    cls._instance = SpuLog(path)
            elif cls._instance is None:
                if os.environ.get("CIPHERDM_SPU_LOG"):
                    cls._instance = SpuLog(private_log_path(os.environ["CIPHERDM_SPU_LOG"]))
                else:  # a private folder of this process's, removed when it exits
                    folder = tempfile.mkdtemp(prefix="cipherdm-spu-log-")
                    atexit.register(shutil.rmtree, folder, ignore_errors=True)
                    cls._instance = SpuLog(private_log_path(Path(folder) / "spu.log"))
            return cls._instance

    def offset(self) -> int:
        return self.path.stat().st_size

    def read_from(self, offset: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
