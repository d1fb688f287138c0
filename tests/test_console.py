"""A party's console lines: a warning is one line, its origin named only when it is not this package's."""

import io
import os

import cipherdm_spu
from cipherdm_spu.console import warning_line

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
