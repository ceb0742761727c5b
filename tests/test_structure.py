"""The house rules of issue 17, checked on the source: layers only point down (no import cycle between
subpackages or modules, imports inside functions included), no function over 60 lines, ruff clean."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
check_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layers)


def test_no_import_cycle_between_layers():
    graph = check_layers.imports(check_layers.modules())
    assert check_layers.layer_cycles(graph) == []


def test_no_import_cycle_between_modules():
    graph = check_layers.imports(check_layers.modules())
    assert check_layers.module_cycles(graph) == []


def test_cycle_detector_finds_a_cycle():
    assert check_layers._cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_60_lines():
    assert check_layers.long_functions(check_layers.modules()) == []


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (make setup installs it)")
    out = subprocess.run([ruff, "check", "src", "tests", "tools"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


_SOURCE = '''
import os


def plot(x):
    # deferred: optional heavy dependency (matplotlib)
    import matplotlib

    import json  # deferred: shown on its own line too
    return matplotlib, json


def run(x):
    from noisesearch.io import atomic_write_text
    return atomic_write_text


class A:
    def method(self):
        # a comment that is not the marker
        import sys
        return sys
'''


def test_local_import_check_accepts_a_deferred_comment_and_flags_the_rest():
    found = check_layers.undeclared_local_imports(_SOURCE, "m.py")
    assert found == ["m.py:14 from noisesearch.io import atomic_write_text", "m.py:21 import sys"]


def test_local_import_check_passes_a_module_without_local_imports():
    assert check_layers.undeclared_local_imports("import os\n\n\ndef f():\n    return os.sep\n") == []


def test_every_import_inside_a_function_says_why_it_is_deferred():
    assert check_layers.local_imports(check_layers.modules()) == []


def test_help_and_import_do_not_load_torch():
    """``import noisesearch`` and ``noisesearch --help`` stay light: the commands' dependencies (torch
    among them) are imported by the command that runs (``# deferred:`` imports in ``noisesearch.cli``)."""
    code = ("import contextlib, io, sys\nimport noisesearch\nassert 'torch' not in sys.modules\n"
            "from noisesearch.cli import main\nwith contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    code = main(['--help'])\nassert code == 0 and 'train-reward' in out.getvalue(), out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'matplotlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
