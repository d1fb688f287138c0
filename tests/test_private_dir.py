"""private_dir: a folder or file is accepted only where no one but this user and root can change it or anything on
its path; missing folders are made 0700. The users' own attacks on the compile cache, and the folders the cluster
writes (logs, certificates, images), are tested with their callers (test_compile_cache, test_security, test_cluster)."""

import os
import stat

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


def test_missing_folders_are_made_0700_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        with private_dir.opened_folder(tmp_path / "a" / "b" / "c") as fd:
            assert os.path.samestat(os.fstat(fd), (tmp_path / "a" / "b" / "c").stat())
    finally:
        os.umask(old)
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3


def test_a_folder_others_can_write_on_the_path_is_refused_before_anything_is_made_in_it(tmp_path):
    above = _folder(tmp_path / "open", 0o777)
    with pytest.raises(PrivatePathError, match=f"{above} on its path has mode 777: others may write it"):
        private_dir.open_folder(above / "mine")
    assert not (above / "mine").exists()
    above.chmod(0o1777)  # sticky: others cannot rename or remove what is not theirs
    os.close(private_dir.open_folder(above / "mine"))
    assert _mode(above / "mine") == 0o700


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o1777])
def test_the_folder_itself_must_be_closed_to_others_even_when_sticky(tmp_path, mode):
    folder = _folder(tmp_path / "folder", mode)
    with pytest.raises(PrivatePathError, match=f"its mode {mode:o} lets others write it"):
        private_dir.open_folder(folder)


@needs_root
def test_folders_of_another_user_are_refused_on_the_path_and_as_the_folder(tmp_path):
    theirs = _folder(tmp_path / "theirs", 0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match="it is owned by uid 65534, not this user"):
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
    os.close(private_dir.open_folder(sticky / "ours" / "logs"))
    assert (mine / "logs").is_dir()


def test_a_relative_symlink_goes_on_from_its_folder_and_is_checked_there(tmp_path):
    base = _folder(tmp_path / "base")
    _folder(base / "real")
    (base / "link").symlink_to("real")
    with private_dir.opened_folder(base / "link" / "inner") as fd:
        assert os.path.samestat(os.fstat(fd), (base / "real" / "inner").stat())
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
    ca.chmod(0o664)
    with pytest.raises(PrivatePathError, match=f"{ca} has mode 664: others may write it"):
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
    folder = _folder(tmp_path / "tls", 0o775)
    (folder / "ca.crt").write_text("certificate")
    (folder / "ca.crt").chmod(0o644)
    with pytest.raises(PrivatePathError, match=f"{folder} on its path has mode 775"):
        private_dir.check_file(folder / "ca.crt")


@needs_root
def test_a_file_of_another_users_is_refused(tmp_path):
    folder = _folder(tmp_path / "tls", 0o755)
    (folder / "ca.crt").write_text("certificate")
    os.chown(folder / "ca.crt", NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match="ca.crt is owned by uid 65534"):
        private_dir.check_file(folder / "ca.crt")
