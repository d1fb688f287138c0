"""Console lines: a warning is one line, its origin named only when it is not this package's, its characters that are
not printable escaped."""

import io
import os

import cipherdm_spu
from cipherdm_spu.console import printable, warning_line

PACKAGE_FILE = os.path.join(os.path.dirname(cipherdm_spu.__file__), "compile_cache.py")


def test_a_warning_is_one_line_naming_a_librarys_origin():
    out = io.StringIO()
    warning_line("compile cache /c: waiting", RuntimeWarning, PACKAGE_FILE, 275, out, "warnings.warn(...)")
    warning_line("overflow in cast", RuntimeWarning, "/site-packages/numpy/core/x.py", 12, out, "y = x.astype(int)")
    assert out.getvalue() == ("warning: compile cache /c: waiting\n"
                              "warning: overflow in cast (RuntimeWarning, x.py:12)\n")


def test_a_console_that_is_gone_loses_the_line_not_the_work():
    closed = io.StringIO()
    closed.close()
    warning_line("a notice", RuntimeWarning, PACKAGE_FILE, 1, closed)  # no exception

    class BrokenPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    warning_line("a notice", RuntimeWarning, PACKAGE_FILE, 1, BrokenPipe())


def test_a_warning_cannot_write_lines_or_escapes_of_its_own(capsys):
    """A warning may carry a party's words (why it did not confirm a session's close): its newlines and terminal
    escapes are written as escapes, so it cannot fake a line, a colour or a cursor move on the user's console."""
    warning_line(UserWarning("refused: ok\n[P0] done\x1b[2K\x1b[1A\r"), UserWarning, PACKAGE_FILE, 1)
    assert capsys.readouterr().err == "warning: refused: ok\\n[P0] done\\x1b[2K\\x1b[1A\\r\n"
    assert printable("tab\tand é ✓") == "tab\\tand é ✓"  # printable characters are kept
