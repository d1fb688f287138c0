"""private_dir: a folder or file is accepted only where no one but this user and root can change it or anything on
its path; missing folders are made 0700. The users' own attacks on the compile cache, and the folders the cluster
writes (logs, certificates, images), are tested with their callers (test_compile_cache, test_security, test_cluster)."""

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from cipherdm_spu import private_dir
from cipherdm_spu.errors import PrivatePathError

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="a folder or symlink of another user's needs root to make")
NOBODY = 65534


def _mode(path):
    return stat.S_IMODE(path.lstat().st_mode)


def _folder(path, mode=0o700):
    path.mkdir()
    path.chmod(mode)
    return path


@pytest.mark.parametrize("umask", [0, 0o277])
def test_missing_folders_are_made_0700_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with private_dir.opened_folder(tmp_path / "a" / "b" / "c") as folder:
            assert os.path.samestat(os.fstat(folder.fd), (tmp_path / "a" / "b" / "c").stat())
            assert folder.path == tmp_path / "a" / "b" / "c"
    finally:
        os.umask(old)
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3


def test_a_folder_others_can_write_on_the_path_is_refused_before_anything_is_made_in_it(tmp_path):
    above = _folder(tmp_path / "open", 0o777)
    with pytest.raises(PrivatePathError, match=f"{above} on its path has mode 777: others may write it"):
        private_dir.open_folder(above / "mine")
    assert not (above / "mine").exists()
    above.chmod(0o1777)  # sticky: others cannot rename or remove what is not theirs
    os.close(private_dir.open_folder(above / "mine").fd)
    assert _mode(above / "mine") == 0o700


@pytest.mark.parametrize("mode", [0o702, 0o1777])
def test_the_folder_itself_must_be_closed_to_others_even_when_sticky(tmp_path, mode):
    folder = _folder(tmp_path / "folder", mode)
    with pytest.raises(PrivatePathError, match=f"has mode {mode:o}: others may write it, and may have left files"):
        private_dir.open_folder(folder)


@needs_root
def test_a_folder_its_group_can_write_is_refused_where_the_group_holds_another_user(tmp_path):
    folder = _folder(tmp_path / "folder", 0o770)
    os.chown(folder, -1, NOBODY)  # nogroup: others' primary group
    with pytest.raises(PrivatePathError, match="has mode 770: others may write it"):
        private_dir.open_folder(folder)


def test_a_user_private_group_is_no_one_else_and_no_other_group_is(monkeypatch):
    """A user private group (Fedora's umask 002 leaves folders group-writable) lets no one else write, as Debian's
    ssh accepts: the owner's primary group, named as the owner, no other member, no one else's primary group. A group
    without members that is not the owner's own (setgid programs' groups, a directory service's group whose members
    it does not list) is not."""
    import grp
    import pwd

    me = pwd.struct_passwd(("me", "x", 1000, 1000, "", "/home/me", "/bin/sh"))
    other = pwd.struct_passwd(("other", "x", 1001, 1000, "", "/home/other", "/bin/sh"))
    groups = {1000: ("me", []), 50: ("staff", [])}
    monkeypatch.setattr(grp, "getgrgid", lambda gid: grp.struct_group((groups[gid][0], "x", gid, groups[gid][1])))
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: me)
    monkeypatch.setattr(pwd, "getpwall", lambda: [me])
    assert private_dir._group_of_owner_alone(1000, 1000)
    assert not private_dir._group_of_owner_alone(50, 1000)  # no members, but not the owner's own
    assert not private_dir._group_of_owner_alone(4242, 1000)  # a group no one knows
    groups[1000] = ("me", ["other"])
    assert not private_dir._group_of_owner_alone(1000, 1000)
    groups[1000] = ("users", [])
    assert not private_dir._group_of_owner_alone(1000, 1000)  # the primary group, but a shared one by its name
    groups[1000] = ("me", [])
    monkeypatch.setattr(pwd, "getpwall", lambda: [me, other])
    assert not private_dir._group_of_owner_alone(1000, 1000)


@needs_root
def test_folders_of_another_user_are_refused_on_the_path_and_as_the_folder(tmp_path):
    theirs = _folder(tmp_path / "theirs", 0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match="theirs is owned by uid 65534, not this user"):
        private_dir.open_folder(theirs, make=False)
    _folder(theirs / "mine")
    with pytest.raises(PrivatePathError, match=f"{theirs} on its path is owned by uid 65534"):
        private_dir.open_folder(theirs / "mine")


@needs_root
def test_a_symlink_of_another_users_is_refused_and_ones_own_followed(tmp_path):
    """The second review's bypass: another user's symlink in a sticky folder, pointing at a folder of this user's."""
    sticky, mine = _folder(tmp_path / "sticky", 0o1777), _folder(tmp_path / "mine")
    (sticky / "theirs").symlink_to(mine)
    os.lchown(sticky / "theirs", NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match=f"{sticky}/theirs on its path is a symlink owned by uid 65534"):
        private_dir.open_folder(sticky / "theirs" / "logs")
    assert not (mine / "logs").exists()
    (sticky / "ours").symlink_to(mine)
    os.close(private_dir.open_folder(sticky / "ours" / "logs").fd)
    assert (mine / "logs").is_dir()


def test_a_relative_symlink_goes_on_from_its_folder_and_is_checked_there(tmp_path):
    base = _folder(tmp_path / "base")
    _folder(base / "real")
    (base / "link").symlink_to("real")
    with private_dir.opened_folder(base / "link" / "inner") as folder:
        assert os.path.samestat(os.fstat(folder.fd), (base / "real" / "inner").stat())
        assert folder.path == base / "real" / "inner"  # the real path: a by-path use reaches what was checked
    open_folder = _folder(tmp_path / "open", 0o777)
    _folder(open_folder / "target")
    (base / "away").symlink_to("../open/target")
    with pytest.raises(PrivatePathError, match=f"{open_folder} on its path has mode 777"):
        private_dir.open_folder(base / "away")


def test_a_loop_of_symlinks_is_refused(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(PrivatePathError, match="loop of symlinks"):
        private_dir.open_folder(tmp_path / "a")


def test_what_is_not_a_folder_and_a_relative_path_are_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PrivatePathError, match="file is not a directory"):
        private_dir.open_folder(tmp_path / "file" / "logs")
    with pytest.raises(PrivatePathError, match="not an absolute path"):
        private_dir.open_folder("relative/logs")
    with pytest.raises(FileNotFoundError):
        private_dir.open_folder(tmp_path / "missing", make=False)


def test_a_file_to_read_must_be_a_regular_file_no_one_else_can_change(tmp_path):
    folder = _folder(tmp_path / "tls")
    ca = folder / "ca.crt"
    ca.write_text("certificate")
    ca.chmod(0o644)
    private_dir.check_file(ca)
    ca.chmod(0o646)
    with pytest.raises(PrivatePathError, match=f"{ca} has mode 646: others may write it"):
        private_dir.check_file(ca)
    ca.chmod(0o644)
    (folder / "link.crt").symlink_to("ca.crt")
    private_dir.check_file(folder / "link.crt")  # a symlink of this user's, to a file it may read
    with pytest.raises(PrivatePathError, match="tls is not a regular file"):
        private_dir.check_file(folder)
    os.mkfifo(folder / "fifo")
    with pytest.raises(PrivatePathError, match="fifo is not a regular file"):
        private_dir.check_file(folder / "fifo")
    with pytest.raises(FileNotFoundError):
        private_dir.check_file(folder / "missing.crt")
    assert not (folder / "missing.crt").exists()


def test_a_file_under_a_folder_others_can_write_is_refused_though_the_file_is_closed(tmp_path):
    """Whoever can write the folder can replace the file (a CA of its own) however the file's own mode reads."""
    folder = _folder(tmp_path / "tls", 0o757)
    (folder / "ca.crt").write_text("certificate")
    (folder / "ca.crt").chmod(0o644)
    with pytest.raises(PrivatePathError, match=f"{folder} on its path has mode 757"):
        private_dir.check_file(folder / "ca.crt")


@needs_root
def test_a_file_of_another_users_is_refused(tmp_path):
    folder = _folder(tmp_path / "tls", 0o755)
    (folder / "ca.crt").write_text("certificate")
    os.chown(folder / "ca.crt", NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match="ca.crt is owned by uid 65534"):
        private_dir.check_file(folder / "ca.crt")


def test_the_path_returned_is_the_one_walked_after_a_symlink_and_dotdot(tmp_path):
    """The attack on the log folder: ``S/link/../logs`` walks the link, then its target's parent; Python's logging
    drops ``..`` by text and would open ``S/logs``, a folder another user may have made in a sticky S."""
    sticky, mine = _folder(tmp_path / "sticky", 0o1777), _folder(tmp_path / "home")
    _folder(mine / "private")
    (sticky / "link").symlink_to(mine / "private")
    _folder(sticky / "logs", 0o777)  # theirs, in the attack
    with private_dir.opened_folder(sticky / "link" / ".." / "logs") as folder:
        assert folder.path == mine / "logs"
        assert os.path.samestat(os.fstat(folder.fd), (mine / "logs").stat())


def test_a_file_made_in_a_folder_is_one_no_one_else_has_been_able_to_open(tmp_path):
    """A folder open to others before it was checked may hold their file, a hard link or a symlink of theirs, or a file
    they keep open (it was readable): only a file of this user's alone with mode 600, as made here, is reused; anything
    else is moved aside and the file made anew."""
    out = tmp_path / "out"
    with private_dir.opened_folder(out) as folder:
        os.close(private_dir.create_file(folder, "spu.log"))
        assert _mode(out / "spu.log") == 0o600
        os.write(fd := private_dir.create_file(folder, "spu.log"), b"kept\n")  # this user's own: reopened
        os.close(fd)
        assert (out / "spu.log").read_text() == "kept\n" and not list(out.glob("spu.log.moved-*"))

        def replaced(plant):
            (out / "spu.log").unlink()
            plant(out / "spu.log")
            planted = os.stat(out / "spu.log", follow_symlinks=False)
            before = set(out.glob("spu.log.moved-*"))
            os.close(private_dir.create_file(folder, "spu.log"))
            new = os.stat(out / "spu.log", follow_symlinks=False)
            (aside,) = set(out.glob("spu.log.moved-*")) - before  # nothing moved earlier is overwritten
            return (os.path.samestat(os.stat(aside, follow_symlinks=False), planted) and stat.S_ISREG(new.st_mode)
                    and new.st_nlink == 1 and _mode(out / "spu.log") == 0o600 and new.st_size == 0)

        (tmp_path / "theirs").write_text("")
        assert replaced(lambda p: os.link(tmp_path / "theirs", p))  # a hard link
        assert replaced(lambda p: p.symlink_to(tmp_path / "theirs"))
        assert replaced(lambda p: (p.write_text("once readable"), p.chmod(0o644)))  # someone may hold it open
        assert replaced(os.mkfifo)
        assert replaced(lambda p: p.mkdir())
        assert (tmp_path / "theirs").read_text() == "" and len(list(out.glob("spu.log.moved-*"))) == 5


def test_processes_making_one_file_at_once_agree(tmp_path):
    import threading

    out = tmp_path / "out"
    with private_dir.opened_folder(out) as folder:
        made, errors = [], []

        def make(name):
            try:
                fd = private_dir.create_file(folder, name)
                made.append(os.fstat(fd).st_ino)
                os.close(fd)
            except Exception as e:  # noqa: BLE001 - the test's verdict
                errors.append(e)

        for round_ in range(20):
            name = f"shared-{round_}.log"
            (out / name).write_text("")
            (out / name).chmod(0o644)  # to be moved aside by whoever comes first
            threads = [threading.Thread(target=make, args=(name,)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors and len(made) == 80


@needs_root
def test_group_write_under_an_access_acl_is_others_write(tmp_path):
    """With a POSIX ACL the group bits are its mask: a 0700 folder of root's plus ``user:65534:rwx`` reads 0770, its
    group root's own private group (here), yet 65534 may write it (a review swapped a log through one)."""
    import struct

    folder = _folder(tmp_path / "acl")
    entries = [(0x01, 7, 0), (0x02, 7, NOBODY), (0x04, 0, 0), (0x10, 7, 0), (0x20, 0, 0)]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(folder, "system.posix_acl_access", acl)
    except OSError as e:
        pytest.skip(f"no POSIX ACLs here ({e})")
    assert _mode(folder) == 0o770
    with pytest.raises(PrivatePathError, match="has mode 770: others may write it"):
        private_dir.open_folder(folder)
    os.removexattr(folder, "system.posix_acl_access")
    folder.chmod(0o750)
    os.close(private_dir.open_folder(folder).fd)
    ca = folder / "ca.pem"  # a file read by path, checked the same way
    ca.write_text("certificate")
    entries = [(0x01, 6, 0), (0x02, 6, NOBODY), (0x04, 0, 0), (0x10, 6, 0), (0x20, 0, 0)]
    os.setxattr(ca, "system.posix_acl_access", struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))
    with pytest.raises(PrivatePathError, match="ca.pem has mode 660: others may write it"):
        private_dir.check_file(ca)


@needs_root
def test_a_planted_file_of_another_users_is_moved_aside(tmp_path):
    with private_dir.opened_folder(tmp_path / "out") as folder:
        (tmp_path / "out" / "spu.log").write_text("theirs")
        os.chown(tmp_path / "out" / "spu.log", NOBODY, NOBODY)
        (tmp_path / "out" / "spu.log").chmod(0o600)
        os.close(private_dir.create_file(folder, "spu.log"))
    assert (tmp_path / "out" / "spu.log").stat().st_uid == 0 and (tmp_path / "out" / "spu.log").read_text() == ""
    (aside,) = (tmp_path / "out").glob("spu.log.moved-*")
    assert aside.stat().st_uid == NOBODY


@needs_root
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")  # the child makes system calls only, then _exit
def test_a_folder_above_that_this_user_may_search_but_not_list_is_walked(request):
    """As the kernel walks a path (0711 /home, 0710 /etc/ssl/private): search permission is enough."""
    base = Path(tempfile.mkdtemp())  # (pytest's folders above tmp_path are closed to that user)
    request.addfinalizer(lambda: shutil.rmtree(base))
    above = _folder(base / "above", 0o711)
    base.chmod(0o711)
    theirs = _folder(above / "theirs")
    (theirs / "ca.crt").write_text("certificate")
    os.chown(theirs, NOBODY, NOBODY)
    os.chown(theirs / "ca.crt", NOBODY, NOBODY)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # as that user: root could list any folder
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            private_dir.check_file(theirs / "ca.crt")
            os.write(write, str(private_dir.open_folder(theirs / "logs").path).encode())
        except BaseException as e:
            os.write(write, f"error: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        said = answer.read()
    os.waitpid(child, 0)
    assert said == str(theirs / "logs")


def test_a_fuse_mount_of_another_users_proves_nothing(tmp_path, monkeypatch):
    """A FUSE daemon reports owners and modes as it likes: a review mounted one (user_allow_other) that showed the
    victim's uid and 0700, and a result went to the daemon. A folder or file on another user's FUSE mount is refused
    (here the mount table and the folder's mount are stood in for: mounting needs FUSE); root's and this user's own
    are walked as any other; a mount the table does not list is refused."""
    mountinfo = (
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        "41 22 0:40 / /home/bob/box rw,nosuid,nodev - fuse.sshfs bob@host: rw,user_id=1001,group_id=1001\n"
        "42 22 0:41 / /mnt/lxc rw - fuse lxcfs rw,user_id=0,group_id=0\n"
        "43 22 8:2 / /media/usb rw - fuseblk /dev/sdb1 rw,allow_other\n")
    assert private_dir.mount_owners(mountinfo) == {22: None, 41: 1001, 42: 0, 43: -1}
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    box = _folder(tmp_path / "box")
    (box / "ca.pem").write_text("certificate")
    (box / "inner").mkdir(mode=0o700)
    real_mount_id, fake = private_dir._mount_id, {}

    def mount_id(fd):  # the box, or a file in it, on mount 4242
        info = os.fstat(fd)
        return next((m for target, m in fake.items() if os.path.samestat(info, target.stat())), real_mount_id(fd))

    monkeypatch.setattr(private_dir, "_mount_id", mount_id)
    table = tmp_path / "mountinfo"
    table.write_text(open("/proc/self/mountinfo").read()
                     + f"4242 1 0:99 / {box} rw - fuse.evil evil rw,user_id={NOBODY + 1},group_id=0\n")
    monkeypatch.setattr(private_dir, "MOUNTINFO", str(table))
    os.close(private_dir.open_folder(tmp_path).fd)  # above it: another mount
    fake[box] = 4242
    for walk in (lambda: private_dir.open_folder(box), lambda: private_dir.open_folder(box / "inner"),
                 lambda: private_dir.check_file(box / "ca.pem")):
        with pytest.raises(PrivatePathError, match=f"{box} is on a FUSE file system mounted by uid {NOBODY + 1}"):
            walk()
    fake.clear()
    fake[box / "ca.pem"] = 4242  # a file that is a mount point of its own
    with pytest.raises(PrivatePathError, match=f"{box}/ca.pem is on a FUSE file system mounted by uid {NOBODY + 1}"):
        private_dir.check_file(box / "ca.pem")
    fake.clear()
    fake[box] = 4343
    with pytest.raises(PrivatePathError, match=f"{box} is on mount 4343, which the mount table does not list"):
        private_dir.open_folder(box)
    table.write_text(open("/proc/self/mountinfo").read()
                     + f"4242 1 0:99 / {box} rw - fuse.mine mine rw,user_id={os.getuid()},group_id=0\n")
    fake[box] = 4242
    os.close(private_dir.open_folder(box).fd)


def test_a_folder_whose_files_are_read_by_name_takes_no_one_elses_files(tmp_path):
    """`check_folder` (protocol sets): the folder root's or this user's, closed to others even when sticky (a sticky
    folder takes anyone's new files), and its path checked as ever."""
    folder = tmp_path / "sets"
    folder.mkdir(mode=0o755)
    private_dir.check_folder(folder)
    for mode in (0o1777, 0o777, 0o1773):
        folder.chmod(mode)
        with pytest.raises(PrivatePathError, match="others may add files to it"):
            private_dir.check_folder(folder)
    folder.chmod(0o755)
    tmp_path.chmod(0o777)  # a folder on its path others can write
    try:
        with pytest.raises(PrivatePathError, match="on its path has mode 777"):
            private_dir.check_folder(folder)
    finally:
        tmp_path.chmod(0o700)
    with pytest.raises(FileNotFoundError):
        private_dir.check_folder(tmp_path / "missing")


@needs_root
def test_a_folder_of_another_user_is_refused_for_files_read_by_name(tmp_path):
    theirs = _folder(tmp_path / "theirs", 0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match="theirs is owned by uid 65534"):
        private_dir.check_folder(theirs)
