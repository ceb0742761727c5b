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
