"""Folders and files that no one but this user (and root) can change, checked on their whole path.

Whoever can change a folder on the path to a file can swap what is beneath it between a check and a use: an
independent review of the compile cache swapped the cache for a folder of its own under a world-writable parent
(RENAME_EXCHANGE in a loop), and another reached the user's folder through its own symlink in a sticky one. So, as
ssh's StrictModes demands of its keys' folders, the rules hold for every component of the path:

- every folder on it is root's or this user's, and writable by no one else unless sticky (as /tmp, where others
  cannot rename or remove what is not theirs);
- every symlink on it is root's or this user's (a symlink cannot be changed, only replaced in its folder);
- a folder this user keeps things in (`open_folder`) is this user's and writable by no one else; a file read from
  such a path (`check_file`: keys, certificates) is a regular file of root's or this user's, writable by no one else.

The path is walked from / one component at a time through open folders (O_PATH: a folder this user may search but
not list is walked as the kernel walks it), each checked before anything is made in it (missing folders are made
0700, not to the umask). Once the whole path passes, no one else can change it, so a later use by path (a log
handler, SPU's own log) reaches what was checked, provided it uses the real path the walk returns (`Folder.path`:
no symlink, no ``..``; Python's logging drops ``..`` by text, which after a symlink names another folder); code that
can use the open folder's descriptor should (O_NOFOLLOW, ``dir_fd``) all the same. A folder group-writable by this
user's private group (its primary group, named as the user, no other member: as Fedora's umask 002 leaves folders)
counts as closed, as Debian's ssh accepts it, unless a POSIX access ACL is set (the group bits are then its mask).
Owners and modes are what the file system reports: a folder on another user's FUSE mount is refused (`_FuseMounts`),
and network file systems are outside what they can promise.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import secrets
import stat
import time
from pathlib import Path
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

from .errors import PrivatePathError

#: symlinks followed on one path at most (Linux's own limit)
MAX_SYMLINKS = 40
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: O_PATH needs search, not read, permission (where the system has it: macOS reads)
_PATH_ONLY = getattr(os, "O_PATH", os.O_RDONLY)
_WALK_DIR = _PATH_ONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC


class Folder(NamedTuple):
    """An open private folder: its descriptor (open for reading) and the real path the walk took to it (no symlink,
    no ``..``), the path to use wherever the folder is reached by path."""
    fd: int
    path: Path


def open_folder(folder: Path, make: bool = True) -> Folder:
    """``folder`` (absolute) open, its whole path passing the module's rules; missing folders are made 0700 where
    ``make``. PrivatePathError names the rule a component breaks; OSError where the path cannot be walked or made
    (FileNotFoundError where a folder is missing and not ``make``)."""
    walked, where = _walk(Path(folder), make, file=False)
    try:
        fd = os.open(".", _READ_DIR, dir_fd=walked)
    finally:
        os.close(walked)
    try:
        _check_own_folder(fd, where)
    except BaseException:
        os.close(fd)
        raise
    return Folder(fd, Path(where))


@contextlib.contextmanager
def opened_folder(folder: Path, make: bool = True) -> Iterator[Folder]:
    """`open_folder`'s folder, its descriptor closed after the block."""
    opened = open_folder(folder, make)
    try:
        yield opened
    finally:
        os.close(opened.fd)


def create_file(folder: Folder, name: str, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """A descriptor of file ``name`` in ``folder`` (``flags`` as os.open's): the file that is there where it is a
    regular file of this user's alone with mode 600 and one link, as made here, else a new one made 0600, whatever was
    there moved aside (`aside_name`). Whoever could write the folder before it was checked may have left a file, a
    symlink or a hard link of its own there; what is written next goes to a file that is, now, this user's alone. (A
    file once readable by others and since made 600 cannot be told from one always 600: someone may still hold it
    open.) PrivatePathError where what is there cannot be moved aside."""
    for _ in range(8):  # another process of this user's may be making the same file (a shared --out)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=folder.fd)
        except OSError:  # none, or a symlink (ELOOP), a FIFO without a reader (ENXIO), a folder, another's file: aside
            fd = None
        if fd is not None:
            info = os.fstat(fd)
            if (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and info.st_nlink == 1
                    and stat.S_IMODE(info.st_mode) == 0o600):
                return fd
            os.close(fd)
        aside = aside_name(name)
        try:
            os.rename(name, aside, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
        except FileNotFoundError:  # nothing there
            pass
        except OSError as e:
            raise PrivatePathError(f"{folder.path / name} is not a file of this user's alone and cannot be moved "
                                   f"aside to {aside} ({e.strerror}): remove it") from None
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600, dir_fd=folder.fd)
        except FileExistsError:
            continue  # made meanwhile: checked as any other
        os.fchmod(fd, 0o600)  # whatever the umask
        return fd
    raise PrivatePathError(f"{folder.path / name} keeps being replaced while it is made")


def aside_name(name: str) -> str:
    """A new name for what is moved aside from ``name``: ``name.moved-<UTC time>-<random>``, so nothing earlier is
    overwritten."""
    return f"{name}.moved-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def check_file(path: Path) -> None:
    """Refuse (PrivatePathError) a file to be read by path that someone other than this user and root could change:
    the file, a folder or a symlink on its path. OSError where it cannot be reached."""
    os.close(_walk(Path(path), make=False, file=True)[0])


def check_folder(path: Path) -> None:
    """Refuse (PrivatePathError) a folder whose files are looked up by name that someone other than this user and root
    could change or add a file to: the folder (sticky or not: a sticky folder takes anyone's new files), a folder or a
    symlink on its path. OSError where it cannot be reached."""
    fd, where = _walk(Path(path), make=False, file=False)
    try:
        info = os.fstat(fd)
        if info.st_uid not in (0, os.getuid()):
            raise PrivatePathError(f"{where} is owned by uid {info.st_uid}")
        if _writable_by_others(info, f"/proc/self/fd/{fd}"):
            raise PrivatePathError(f"{where} has mode {stat.S_IMODE(info.st_mode):o}: others may add files to it "
                                   "(chmod go-w it)")
    finally:
        os.close(fd)


def _walk(path: Path, make: bool, file: bool) -> Tuple[int, str]:
    """An O_PATH descriptor of the last folder reached walking ``path`` from /, and its real path: ``path`` itself, or
    with ``file`` the folder holding the regular file it names. Each folder is checked as a folder on the path before
    anything in it is used; symlinks are followed only where root or this user owns them."""
    if not path.is_absolute():
        raise PrivatePathError(f"{path} is not an absolute path")
    pending = list(reversed(path.parts[1:]))
    fd, where, hops = os.open("/", _WALK_DIR), "/", 0
    mounts = _FuseMounts()
    try:
        _check_folder_on_path(fd, where)
        mounts.check(fd, where)
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            info = _stat_or_make(fd, part, make)
            # the real path walked so far: a symlink is never in it (its target is walked instead), so ".." is lexical
            where = (where.rsplit("/", 1)[0] or "/") if part == ".." else f"{where.rstrip('/')}/{part}"
            if stat.S_ISLNK(info.st_mode):
                if info.st_uid not in (0, os.getuid()):
                    raise PrivatePathError(f"{where} on its path is a symlink owned by uid {info.st_uid}")
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise PrivatePathError("its path has a loop of symlinks")
                target = os.readlink(part, dir_fd=fd)
                where = where.rsplit("/", 1)[0] or "/"  # a relative target goes on from the link's folder
                if os.path.isabs(target):
                    previous, fd, where = fd, os.open("/", _WALK_DIR), "/"
                    os.close(previous)
                    _check_folder_on_path(fd, where)
                    mounts.check(fd, where)
                pending.extend(reversed([p for p in Path(target).parts if p != "/"]))
                continue
            if file and not pending:  # checked through a descriptor, as the folders are
                inode = os.open(part, _PATH_ONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=fd)
                try:
                    _check_file(inode, where)
                    mounts.check(inode, where)  # (a file may be a mount point of its own)
                finally:
                    os.close(inode)
                return fd, where
            if not stat.S_ISDIR(info.st_mode):
                raise PrivatePathError(f"{where} is not a directory")
            previous, fd = fd, os.open(part, _WALK_DIR, dir_fd=fd)
            os.close(previous)
            if pending or file:  # (the folder itself: the caller's stricter rule)
                _check_folder_on_path(fd, where)
            mounts.check(fd, where)
        if file:
            raise PrivatePathError(f"{where} is not a regular file")
        return fd, where
    except BaseException:
        os.close(fd)
        raise


class _FuseMounts:
    """The mount table, read from MOUNTINFO where a walk first needs it and again for a mount it does not list: a FUSE
    file system reports whatever owners and modes its daemon likes, so one mounted by another user (``user_id`` in
    its options) proves nothing of what it holds (a review had a result written to another user's daemon through a
    folder reported as the victim's, 0700). A mount the table still does not list once read again (one made after
    the descriptor was opened cannot be: the descriptor holds it) is refused. Only where /proc is not mounted at all
    (no /proc/self) nothing is refused: the rules stand on the owners and modes reported. Network file systems (NFS)
    are outside what owners and modes can promise; ``user_id`` is read as this process's namespace sees it."""

    def __init__(self):
        self._mounters: Optional[Dict[int, Optional[int]]] = None

    def check(self, fd: int, where: str) -> None:
        mount = _mount_id(fd)
        if mount is None:  # no /proc
            return
        if self._mounters is None or mount not in self._mounters:
            with open(MOUNTINFO, "rb") as f:
                self._mounters = mount_owners(f.read().decode("utf-8", "replace"))
        if mount not in self._mounters:
            raise PrivatePathError(f"{where} is on mount {mount}, which the mount table does not list")
        mounter = self._mounters[mount]
        if mounter is not None and mounter not in (0, os.getuid()):
            raise PrivatePathError(f"{where} is on a FUSE file system mounted by uid {mounter}, which reports owners "
                                   "and modes as it likes (choose a folder elsewhere)")


#: the mount table (Linux)
MOUNTINFO = "/proc/self/mountinfo"


def mount_owners(mountinfo: str) -> Dict[int, Optional[int]]:
    """Mount id -> None for every mount of a /proc/PID/mountinfo text, except FUSE mounts (types fuse, fuse.*,
    fuseblk): the uid that mounted them (their ``user_id`` option; -1 where none can be read)."""
    owners: Dict[int, Optional[int]] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            mount = int(fields[0])
        except (IndexError, ValueError):
            continue
        tail = fields[fields.index("-") + 1:] if "-" in fields else []
        if not tail or not (tail[0] in ("fuse", "fuseblk") or tail[0].startswith("fuse.")):
            owners[mount] = None
            continue
        options = dict(o.split("=", 1) for o in (tail[2] if len(tail) > 2 else "").split(",") if "=" in o)
        try:
            owners[mount] = int(options.get("user_id", "-1"))
        except ValueError:
            owners[mount] = -1
    return owners


def _mount_id(fd: int) -> Optional[int]:
    """The mount ``fd`` is on, from /proc/self/fdinfo; None only where /proc is not mounted (OSError otherwise)."""
    if not os.path.isdir("/proc/self"):
        return None
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/fdinfo/{fd} gives no mount id")


def _stat_or_make(fd: int, name: str, make: bool) -> os.stat_result:
    """``name``'s lstat in the open folder ``fd``, made a folder 0700 first where missing and ``make``."""
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        if not make:
            raise
    try:
        os.mkdir(name, 0o700, dir_fd=fd)  # in a folder only this user and root can change
        os.chmod(name, 0o700, dir_fd=fd)  # whatever the umask (one clearing the owner's bits too)
    except FileExistsError:  # (made by another process meanwhile: checked as any other)
        pass
    return os.stat(name, dir_fd=fd, follow_symlinks=False)


def _writable_by_others(info: os.stat_result, inode: str) -> bool:
    """Writable by another user than the owner: by others, or by a group other than the owner's private group. Where
    an access ACL is set the group bits are its mask, the most any named user or group may do, so a group bit of w
    counts as others' (``inode``: a path to the inode itself, for its ACL)."""
    if info.st_mode & stat.S_IWOTH:
        return True
    if not info.st_mode & stat.S_IWGRP:
        return False
    return not _group_of_owner_alone(info.st_gid, info.st_uid) or _has_access_acl(inode)


def _has_access_acl(inode: str) -> bool:
    """Whether ``inode`` has a POSIX access ACL (where it cannot be told, it is taken to have one)."""
    if not hasattr(os, "getxattr"):
        return True
    try:
        os.getxattr(inode, "system.posix_acl_access")
    except OSError as e:
        return e.errno not in (errno.ENODATA, errno.ENOTSUP)
    return True


def _group_of_owner_alone(gid: int, uid: int) -> bool:
    """Whether ``gid`` is the user private group of ``uid``: its primary group, named as the user, with no other member
    and no one else's primary group as far as the user database lists (a directory service may not list its users:
    the name and the primary gid are what mark a user private group). An unknown group or owner is not; nor is a
    group without members that is not the owner's own, as setgid programs use."""
    try:
        group, owner = grp.getgrgid(gid), pwd.getpwuid(uid)
    except KeyError:
        return False
    if gid != owner.pw_gid or group.gr_name != owner.pw_name or set(group.gr_mem) - {owner.pw_name}:
        return False
    return all(user.pw_uid == uid for user in pwd.getpwall() if user.pw_gid == gid)


def _check_folder_on_path(fd: int, where: str) -> None:
    info = os.fstat(fd)
    if info.st_uid not in (0, os.getuid()):
        raise PrivatePathError(f"{where} on its path is owned by uid {info.st_uid} (choose a folder on a path of "
                               "this user's or root's)")
    if _writable_by_others(info, f"/proc/self/fd/{fd}") and not info.st_mode & stat.S_ISVTX:
        raise PrivatePathError(f"{where} on its path has mode {stat.S_IMODE(info.st_mode):o}: others may write it "
                               "and it is not sticky (chmod go-w it, or choose a folder elsewhere)")


def _check_own_folder(fd: int, where: str) -> None:
    info = os.fstat(fd)
    if info.st_uid != os.getuid():
        raise PrivatePathError(f"{where} is owned by uid {info.st_uid}, not this user")
    if _writable_by_others(info, f"/proc/self/fd/{fd}"):
        raise PrivatePathError(f"{where} has mode {stat.S_IMODE(info.st_mode):o}: others may write it, and may "
                               "have left files in it (choose a new folder)")


def _check_file(fd: int, where: str) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise PrivatePathError(f"{where} is not a regular file")
    if info.st_uid not in (0, os.getuid()):
        raise PrivatePathError(f"{where} is owned by uid {info.st_uid}")
    if _writable_by_others(info, f"/proc/self/fd/{fd}"):
        raise PrivatePathError(f"{where} has mode {stat.S_IMODE(info.st_mode):o}: others may write it (chmod go-w it)")
