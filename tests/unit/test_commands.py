"""commands.parse: every bad payload becomes one CommandError (never another exception), checked
in the order that keeps hostile input cheap: size, verb, nesting, JSON, fields."""
from __future__ import annotations

import json

import pytest

from lepton_edge.agent.commands import CommandError, nesting, parse
from lepton_edge.telemetry.schema import (
    MAX_COMMAND_BYTES,
    MAX_COMMAND_DEPTH,
    DeployCommand,
    PingCommand,
    SetCommand,
)

SHA = "ab" * 32


def err(verb: str, payload: bytes) -> CommandError:
    with pytest.raises(CommandError) as e:
        parse(verb, payload)
    return e.value


@pytest.mark.parametrize("payload", [b"", b"  \n", b"{}"])
def test_empty_ping_is_a_ping(payload):
    assert isinstance(parse("ping", payload), PingCommand)


def test_fields_are_typed_and_kept():
    cmd = parse("set", b'{"id": "c1", "window_s": 5, "sample_every": 2, "threads": 4, "telemetry": false}')
    assert isinstance(cmd, SetCommand)
    assert (cmd.id, cmd.window_s, cmd.sample_every, cmd.threads, cmd.telemetry) == ("c1", 5.0, 2, 4, False)
    d = parse("deploy", json.dumps({"url": "https://h/b.tar.gz", "sha256": SHA}).encode())
    assert isinstance(d, DeployCommand) and d.url == "https://h/b.tar.gz" and d.sha256 == SHA


@pytest.mark.parametrize("verb, body, field", [
    ("set", {"threads": True}, "threads"),  # strict: true is not 1 thread
    ("set", {"threads": "2"}, "threads"),
    ("set", {"telemetry": "no"}, "telemetry"),
    ("set", {"threads": 0}, "threads"),
    ("set", {"window_s": 0.01}, "window_s"),
    ("set", {"bogus": 1}, "bogus"),  # unknown fields are refused, not ignored
    ("deploy", {"url": "https://h/b.tar.gz", "sha256": "ABC"}, "sha256"),
    ("deploy", {"path": "/b", "health_frames": 0}, "health_frames"),
])
def test_bad_fields_name_the_field(verb, body, field):
    e = err(verb, json.dumps(body).encode())
    assert f"field '{field}'" in str(e)


@pytest.mark.parametrize("body", [{}, {"url": "https://h/b.tar.gz", "path": "/b"}])
def test_deploy_needs_exactly_one_source(body):
    assert "exactly one of 'url' or 'path'" in str(err("deploy", json.dumps(body).encode()))


def test_the_command_id_comes_back_with_a_field_error():
    assert err("set", b'{"id": "abc", "threads": 0}').command_id == "abc"
    assert err("set", json.dumps({"id": "x" * 129, "threads": 0}).encode()).command_id is None
    assert err("set", b'{"id": 7, "threads": 0}').command_id is None


def test_unknown_verb_is_named_short_and_lists_the_known_ones():
    e = str(err("reboot" + "x" * 500, b"{}"))
    assert "unknown verb" in e and "ping, set, deploy" in e and len(e) < 200


def test_size_is_checked_before_anything_else():
    big = b'{"id": "' + b"a" * MAX_COMMAND_BYTES + b'"}'
    assert "exceeds" in str(err("no-such-verb", big))  # not "unknown verb": size comes first


@pytest.mark.parametrize("payload, words", [
    (b"\xff\xfe", "not JSON"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"ping"', "must be a JSON object"),
    (b"[" * 60_000, "nests deeper"),  # json.loads would raise RecursionError
    (b'{"a":' * (MAX_COMMAND_DEPTH + 1) + b"1" + b"}" * (MAX_COMMAND_DEPTH + 1), "nests deeper"),
])
def test_undecodable_payloads_are_one_command_error(payload, words):
    assert words in str(err("ping", payload))


def test_brackets_inside_strings_do_not_count_as_nesting():
    cmd = parse("ping", json.dumps({"id": "[" * 60 + '\\"{' * 20}).encode())
    assert cmd.id.startswith("[[[")


@pytest.mark.parametrize("text, depth", [
    ("{}", 1), ('{"a": [1, {"b": []}]}', 4), ('"[[[["', 0), ('["\\"[", [[]]]', 3), ('"\\\\"[', 1), ("", 0),
])
def test_nesting(text, depth):
    assert nesting(text) == depth
