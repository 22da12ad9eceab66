"""The tier marks of tests/conftest.py, on a throw-away test file collected with the real conftest:
a test that uses a slow fixture (directly, through another fixture, or named by a parameter), that
starts a broker, or that starts a server in its own body stays out of `make test-fast`."""
from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

TESTS = '''
import pytest

@pytest.fixture
def through(int8_bundle):
    return int8_bundle

def test_plain(tmp_path):
    pass

def test_bundle(int8_bundle):
    pass

def test_indirect(through):
    pass

@pytest.mark.parametrize("which", ["rpi4_bundle"])
def test_by_name(which, request):
    request.getfixturevalue(which)

def test_broker(mosquitto):
    pass

def test_inline_camera():
    srv = MjpegServer([], fps=1).start()
'''


def test_marks_by_fixture_parameter_and_inline_server(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_tiers_sample=TESTS)
    items, _ = pytester.inline_genitems("-p", "no:cacheprovider")
    marks = {item.name: {m for m in ("slow", "network") if item.get_closest_marker(m)} for item in items}
    assert marks == {
        "test_plain": set(),  # the only one `make test-fast` runs
        "test_bundle": {"slow"}, "test_indirect": {"slow"}, "test_by_name[rpi4_bundle]": {"slow"},
        "test_broker": {"network"}, "test_inline_camera": {"network"},
    }
