"""parse_broker: the URLs a device and `deploy` accept, their defaults, and one-line BadInput for the rest."""
from __future__ import annotations

import pytest

from lepton_edge.errors import BadInput
from lepton_edge.telemetry.broker import BrokerAddress, make_client, parse_broker


@pytest.mark.parametrize("url, want", [
    ("localhost", BrokerAddress("localhost", 1883, False, "tcp", "/mqtt", None, None)),
    ("10.0.0.5:1999", BrokerAddress("10.0.0.5", 1999, False, "tcp", "/mqtt", None, None)),
    ("mqtt://broker", BrokerAddress("broker", 1883, False, "tcp", "/mqtt", None, None)),
    ("mqtts://broker", BrokerAddress("broker", 8883, True, "tcp", "/mqtt", None, None)),
    ("ws://broker/ws", BrokerAddress("broker", 80, False, "websockets", "/ws", None, None)),
    ("wss://broker:8443", BrokerAddress("broker", 8443, True, "websockets", "/mqtt", None, None)),
    ("mqtt://dev%201:p%40ss%3Aw@broker:1884", BrokerAddress("broker", 1884, False, "tcp", "/mqtt", "dev 1", "p@ss:w")),
    ("mqtt://user@broker", BrokerAddress("broker", 1883, False, "tcp", "/mqtt", "user", None)),
    ("mqtt://[::1]:1885", BrokerAddress("::1", 1885, False, "tcp", "/mqtt", None, None)),
])
def test_urls_and_their_defaults(url, want):
    assert parse_broker(url) == want


@pytest.mark.parametrize("url, words", [
    ("http://broker", "scheme must be one of mqtt://, mqtts://, ws://, wss://"),
    ("mqtt://:1883", "has no host"),
    ("mqtt://", "has no host"),
    ("mqtt://broker:99999", "bad port"),
    ("mqtt://broker:port", "bad port"),
    ("mqtt://[bad", "is not a URL"),
])
def test_bad_urls_are_one_line_bad_input(url, words):
    with pytest.raises(BadInput) as e:
        parse_broker(url)
    assert words in str(e.value) and repr(url) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_tls_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="TLS files"):
        make_client(parse_broker("mqtts://broker"), "dev1", ca_file=str(tmp_path / "missing-ca.pem"))


def test_flags_win_over_credentials_in_the_url():
    c = make_client(parse_broker("mqtt://urluser:urlpw@broker"), "dev1", username="flaguser", password="flagpw")
    assert (c.username, c.password) == ("flaguser", "flagpw")
    c = make_client(parse_broker("mqtt://urluser:urlpw@broker"), "dev1")
    assert (c.username, c.password) == ("urluser", "urlpw")
