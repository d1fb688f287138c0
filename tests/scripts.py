"""The scripts of scripts/ as modules, for the tests that call their main() or helpers; loaded by path, so
nothing is put on sys.path (the scripts import only the installed package)."""

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/NAME.py, imported (its main() not run)."""
    spec = importlib.util.spec_from_file_location(f"scripts.{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
