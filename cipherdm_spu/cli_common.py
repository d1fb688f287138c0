"""What the sampling command lines share: the secure-run options, where the parties are, the progress
bar, private output files, and one error convention (usage errors exit 2, failed runs exit 1, an interrupted run
128 + the signal's number).

Embedded (default): this process plays the owner, the user and the three parties (`SecureSession`).
With ``--cluster CONFIG --model-id ID``: this process is the user only; the model is the one its owner
uploaded (`spu-launch upload`), and this machine holds neither its weights nor any share but its own
result's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import stat
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from . import cluster_config, private_dir, registry
from .console import printable, warning_line
from .errors import ClusterConfigError, ClusterError, InputError, PrivatePathError, ProtocolError, SessionError, UsageError
from .plan import NAME
from .registry import available_protocol_sets
from .sampling import SecureDiffusion, is_text_conditional, one_hot

#: the largest seed numpy's generator takes from the command line here
MAX_SEED = 2**32 - 1


#: arguments may come from a file named after this prefix (argparse's fromfile_prefix_chars)
FROM_FILE = "@"


class UserArgumentParser(argparse.ArgumentParser):
    """A user's command line, whose arguments may also come from files (FROM_FILE + name): a process's command line is
    readable by every local user (ps, /proc/PID/cmdline) while a run lasts, so a user keeps its secret arguments (a
    prompt, labels, a seed) in a file only it can read. One argument per line, or an option and its value on one
    line (`--prompt a cat`); blank lines are skipped. A file that others may read is warned about."""

    def __init__(self, *, secrets: str, **kwargs):
        epilog = (f"Arguments may also come from a file, {FROM_FILE}FILE: one per line, or an option and its value "
                  f"(--seed 1234). Any user of this machine can read a process's command line, so give {secrets} in a "
                  f"file only you can read (chmod 600). An option's value that starts with {FROM_FILE} is read as a "
                  f"file name: write it as --option={FROM_FILE}...")
        super().__init__(epilog=epilog, fromfile_prefix_chars=FROM_FILE, **kwargs)

    def convert_arg_line_to_args(self, arg_line: str) -> list:
        line = arg_line.strip()
        if not line:
            return []
        option, space, value = line.partition(" ")
        return [option, value.strip()] if option.startswith("-") and "=" not in option and space else [line]

    def parse_known_args(self, args=None, namespace=None):
        for arg in sys.argv[1:] if args is None else args:
            if isinstance(arg, str) and arg.startswith(FROM_FILE):
                try:
                    mode = os.stat(arg[1:]).st_mode
                except OSError:
                    continue  # argparse names a missing file
                if mode & (stat.S_IRGRP | stat.S_IROTH):
                    print(f"warning: {arg[1:]} is readable by other users of this machine (chmod 600 keeps its "
                          "arguments yours)", file=sys.stderr)
        return super().parse_known_args(args, namespace)


def add_secure_options(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the user's noise, 0..{MAX_SEED}, to reproduce a run (default: fresh noise from the "
                        "operating system's randomness: the noise is the user's secret, and a default seed would make it "
                        "public)")
    p.add_argument("--protocol", default="cipherdm",
                   help=f"protocol set: {' | '.join(available_protocol_sets())} (default: cipherdm)")
    p.add_argument("--override", action="append", default=[], metavar="OP=KERNEL",
                   help="per-op kernel override, e.g. --override softmax=spu or --override silu=cipherdm-paper (repeatable)")
    p.add_argument("--cluster", type=Path, default=None, metavar="CONFIG",
                   help="sample on the three-party cluster of this config (spu-launch) as a user, with --model-id, "
                        "instead of playing every role in this process")
    p.add_argument("--model-id", default=None, help="with --cluster: the id under which the owner uploaded the model")
    p.add_argument("--model-owner", default=None, metavar="OWNER",
                   help="with --cluster: whose model --model-id is, its owner's certificate name (owner or owner-NAME, "
                        "as `spu-launch upload` prints it; each owner's ids are its own)")
    p.add_argument("--as", dest="identity", default="user",
                   help="with --cluster: this user's identity in the config's tls.clients (default: user)")
    p.add_argument("--out", type=Path, default=Path("runs") / out_default,
                   help=f"output directory, created private (0700) (default: runs/{out_default})")


def parse_overrides(items) -> dict:
    overrides = {}
    for item in items:
        op, sep, kernel = item.partition("=")
        if not sep or not op.strip() or not kernel.strip():
            raise UsageError(f"--override expects OP=KERNEL, got {item!r}")
        overrides[op.strip()] = kernel.strip()
    return overrides


def check_secure_options(args) -> dict:
    """Validate the shared options; returns the overrides. Loads --cluster into a ClusterConfig."""
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    overrides = parse_overrides(args.override)
    try:
        registry.validate(registry.resolve(args.protocol, overrides))
    except ProtocolError as err:
        raise UsageError(str(err)) from None
    if args.cluster is None:
        if args.model_id is not None or args.model_owner is not None:
            raise UsageError("--model-id and --model-owner are for --cluster runs")
        return overrides
    if args.model_id is None or not NAME.fullmatch(args.model_id):
        raise UsageError("--cluster needs --model-id ID (1-64 letters, digits, '.', '_' or '-')")
    if args.model_owner is None:
        raise UsageError("--cluster needs --model-owner OWNER, whose model --model-id is (each owner's ids are its "
                         "own; `spu-launch upload` printed it)")
    if cluster_config.role_of(args.model_owner) != "owner":
        raise UsageError(f"--model-owner {args.model_owner!r} is no owner's name (owner or owner-NAME)")
    if getattr(args, "compare", False):
        raise UsageError("--compare needs the owner's weights, which a user of a cluster does not hold")
    try:
        args.cluster = cluster_config.load(args.cluster)
        args.cluster.client(args.identity)
    except ClusterConfigError as err:
        raise UsageError(f"--cluster: {err}") from None
    return overrides


def check_finite(name: str, value: float, low: Optional[float] = None, high: Optional[float] = None) -> None:
    if not np.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            bounds = f" in [{low:g}, {high:g}]"
        else:
            bounds = f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else ""
        raise UsageError(f"{name} must be a finite number{bounds}, got {value}")


@contextlib.contextmanager
def user_clients(args):
    """The user's channels to the cluster of ``args.cluster``."""
    from .client import PartyClients

    with PartyClients(args.cluster, args.identity) as clients:
        yield clients


def cluster_model(args) -> tuple[dict, object]:
    """(manifest, model) of ``--model-id`` as the parties hold it: the public config, no weights."""
    from .jobs import MODEL_KINDS, model_manifest

    with user_clients(args) as clients:
        manifest = model_manifest(clients, args.model_id, owner=args.model_owner)
    return manifest, MODEL_KINDS[manifest["kind"]].from_config(manifest["config"])


def secure_sample(args, desc: str, sampler, x_t, overrides: dict, job: dict, model=None, params=None,
                  condition=None, step_noise=None, guidance_scale: float = 1.0):
    """Sample under MPC where ``args`` says, with a progress bar; returns (result, total cost, per-step, where).

    Embedded: this process shares ``params`` as the owner. Cluster: ``job`` is sent to the parties,
    who build the step themselves from the owner's upload. ``condition``: class labels (integers) for a
    `UNet2DModel`, the text contexts (`sampling.text_condition`) for a `UNet2DConditionModel`.
    """
    bar = tqdm(total=sampler.num_steps, desc=desc, unit="step")

    def on_step(report):
        bar.set_postfix_str(f"{report.seconds:.1f} s/step, {report.bytes_sent / 1e6:.0f} MB sent")
        bar.update()

    try:
        if args.cluster is None:
            from .session import SecureSession

            with SecureSession(args.protocol, overrides, log_file=str(args.out / "spu.log")) as session:
                diffusion = SecureDiffusion(session, model, params, sampler, guidance_scale=guidance_scale)
                result, total, steps = diffusion.sample(x_t, step_noise=step_noise, on_step=on_step,
                                                        **_condition_argument(model, condition))
                diffusion.close()
            return result, total, steps, "embedded (one process)"
        from .jobs import sample_on_cluster

        bar.write("opening a session: each party compiles and audits the step itself (a minute or more here)")
        if condition is not None and not is_text_conditional(model):
            condition = one_hot(condition, model.config.num_class_embeds)
        with user_clients(args) as clients:
            result, total, steps = sample_on_cluster(clients, args.model_id, job, x_t, condition, step_noise, on_step,
                                                     owner=args.model_owner)
        where = f"cluster {args.cluster.source} (as {args.identity}, model {args.model_id} of {args.model_owner})"
        return result, total, steps, where
    finally:
        bar.close()


def _condition_argument(model, condition) -> dict:
    return {"context": condition} if is_text_conditional(model) else {"labels": condition}


def model_dirs(path: Path) -> tuple[Path, Path]:
    """(unet directory, scheduler config) of a model directory or of a diffusers pipeline directory."""
    if (path / "unet").is_dir():
        return path / "unet", path / "scheduler" / "scheduler_config.json"
    return path, path / "scheduler_config.json"


def load_model_dir(path: Path):
    """(model, params, scheduler config dict) from a local diffusers directory; the owner's side."""
    from .models import UNet2DConditionModel, UNet2DModel

    unet_dir, scheduler = model_dirs(path)
    config = json.loads((unet_dir / "config.json").read_text())
    cls = UNet2DConditionModel if config.get("cross_attention_dim") else UNet2DModel
    model, params = cls.from_pretrained(unet_dir)
    return model, params, json.loads(scheduler.read_text())


def private_output_dir(path: Path) -> Path:
    """The output folder's real path (`private_dir.Folder.path`), the folder this user's alone: no one else may be able
    to change it or anything on its path (`private_dir`), since the image is written into it by path. Missing folders
    are made 0700; an existing one keeps its mode (others may list it, never read what is written in it: 0600)."""
    try:
        path = Path(path).absolute()
        with private_dir.opened_folder(path) as folder:
            return folder.path
    except PrivatePathError as e:
        raise UsageError(f"--out {path}: {e}; the image is the user's alone, so no one but this user (uid "
                         f"{os.getuid()}) and root may be able to change the folder or a folder on its path") from None
    except OSError as e:
        raise UsageError(f"--out {path}: cannot make or open the folder ({e})") from None


def write_private(path: Path, write: Callable[[object], None]) -> None:
    """Write ``path`` atomically and 0600 through the file object ``write`` is given: the result is the user's alone.
    (A folder where the file goes, as one open to others before may hold, is moved aside: `private_dir.aside_name`.)"""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if path.is_dir() and not path.is_symlink():
            os.rename(path, path.with_name(private_dir.aside_name(path.name)))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_array(path: Path, array: np.ndarray) -> None:
    write_private(path, lambda f: np.save(f, array))


def write_json(path: Path, report: dict) -> None:
    write_private(path, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP (``kill``, ``timeout``, a closed terminal) during a cluster run, raised where the run
    is, as Ctrl-C raises KeyboardInterrupt: the job's cleanup (`jobs.sample_on_cluster` closes its session at every
    party) then runs, where SIGTERM's and SIGHUP's default would end the process at once and leave the parties
    holding the session until their idle timeout (``session_idle_s``), refusing everyone else."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: the signals a cluster run ends on as on Ctrl-C
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _interrupts_raised():
    """While the block runs, the first of INTERRUPTS raises `Interrupted` and the rest are ignored from then on (a
    closing terminal sends SIGHUP twice; a second Ctrl-C would cut the cleanup short: the client's calls have
    deadlines, so the cleanup ends); a signal ignored before (``nohup``'s SIGHUP) stays ignored; the earlier handlers
    are put back after. Only in the main thread, where Python runs signal handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    earlier = {}

    def interrupt(signum, frame):
        for other in earlier:
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(signum)

    try:
        for signum in INTERRUPTS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                earlier[signum] = signal.signal(signum, interrupt)
        yield
    finally:
        for signum, handler in earlier.items():
            signal.signal(signum, handler)


def run_main(parser: argparse.ArgumentParser, run: Callable, args, summary: Callable[[dict], str]) -> int:
    """Run a command: usage errors print the usage and exit 2; failed secure runs exit 1; warnings are one line each
    (`console.warning_line`: a party that did not confirm a session's close, a compile cache's wait); an interrupted run
    prints one line instead of a traceback and returns 128 + the signal's number (`exit_status` ends the process as
    that signal would). A cluster run ends on SIGTERM and SIGHUP as on Ctrl-C (`Interrupted`), closing its session;
    an embedded one, which has nothing outside this process to clean up, keeps their defaults (an immediate end,
    where a cleanup would wait for SPU's current step)."""
    try:
        with _interrupts_raised() if getattr(args, "cluster", None) is not None else contextlib.nullcontext(), \
                warnings.catch_warnings():
            warnings.showwarning = warning_line  # a notice to the user is one line, as a party's are
            report = run(args)
    except (UsageError, InputError, ClusterConfigError, PrivatePathError) as err:
        parser.print_usage(sys.stderr)
        print(printable(f"{parser.prog}: error: {err}"), file=sys.stderr)
        return 2
    except (SessionError, ClusterError) as err:  # a party unreachable, refusing, or lost mid-run
        print(printable(f"{parser.prog}: error: {err}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        closed = "; a cluster session it opened was closed at every party that answered" if isinstance(
            err, Interrupted) else ""
        with contextlib.suppress(OSError):  # after a hangup the terminal may be gone
            print(f"\n{parser.prog}: interrupted by {signal.Signals(signum).name}: the run stopped{closed}",
                  file=sys.stderr)
        return 128 + signum
    print(summary(report))
    return 0


def exit_status(code: int) -> None:
    """End the process with ``code`` from `run_main`; an interrupted run's (128 + one of INTERRUPTS) by that signal
    itself, as its default handler would, so that a shell loop running the command stops as it does on Ctrl-C."""
    if code - 128 in tuple(INTERRUPTS):
        signum = signal.Signals(code - 128)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    sys.exit(code)
