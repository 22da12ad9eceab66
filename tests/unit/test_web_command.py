"""The dashboard's command endpoint, below HTTP: the token check and the body -> command model step,
each bad request one 400/401 line (the route itself, over a real server, is in tests/test_fleet_web.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("starlette")

from lepton_edge.fleet.web.app import ApiError, _check_token, _parse_command  # noqa: E402
from lepton_edge.telemetry.schema import DeployCommand, SetCommand  # noqa: E402


def _refused(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    assert "\n" not in e.value.message
    return e.value


def test_token_is_required_and_compared():
    _check_token("Bearer s3cret", "s3cret")
    _check_token("bearer s3cret", "s3cret")  # the scheme is case-insensitive, the token is not
    for header, token in [("Bearer S3CRET", "s3cret"), ("s3cret", "s3cret"), ("Bearer ", "s3cret"),
                          ("Bearer s3cret", None), ("Bearer s3cret", "")]:
        assert _refused(_check_token, header, token).status == 401, (header, token)


def test_body_becomes_the_verbs_model():
    cmd = _parse_command("set", b'{"id": "a1", "threads": 2}')
    assert isinstance(cmd, SetCommand) and cmd.threads == 2 and cmd.id == "a1"
    assert isinstance(_parse_command("set", b""), SetCommand)  # an empty body is {}
    cmd = _parse_command("deploy", b'{"url": "https://h/b.tar.gz"}')
    assert isinstance(cmd, DeployCommand) and cmd.url == "https://h/b.tar.gz"


@pytest.mark.parametrize("verb, body, says", [
    ("set", b"{not json", "the command body is not JSON"),
    ("set", b"[1, 2]", "must be a JSON object"),
    ("deploy", b'{"path": "/srv/b"}', "takes an http(s) 'url'"),
    ("deploy", b'{"url": "ftp://h/b.tar.gz"}', "takes an http(s) 'url'"),
    ("set", b'{"threads": "two"}', "set: threads: "),  # the field that failed, pydantic's first message
    ("set", b'{"threads": 0}', "set: threads: "),
    ("set", b'{"colour": 1}', "set: colour: "),
])
def test_bad_body_is_one_400_line_naming_the_field(verb, body, says):
    e = _refused(_parse_command, verb, body)
    assert e.status == 400 and says in e.message, e.message
