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
    ("mqtt://broker:0", "bad port"),  # was read as no port: 1883, without a word
    ("mqtt://bro\x00ker:1883", "control character"),  # ran, never connecting, and said nothing
    ("mqtt://[bad", "is not a URL"),
])
def test_bad_urls_are_one_line_bad_input(url, words):
    with pytest.raises(BadInput) as e:
        parse_broker(url)
    assert words in str(e.value) and repr(url) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_tls_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="TLS ca_file not found"):
        make_client(parse_broker("mqtts://broker"), "dev1", ca_file=str(tmp_path / "missing-ca.pem"))


def test_tls_files_are_checked_before_openssl_opens_them(tmp_path):
    """A FIFO as ca_file or cert_file held the agent's start until a signal came (a systemd start timeout and
    a restart loop); /dev/zero as a certificate read on; a client certificate given for a plain mqtt:// broker
    was dropped without a word."""
    import os

    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    for kw, words in (({"ca_file": str(fifo)}, "TLS ca_file .*not a regular file"),
                      ({"ca_file": "/dev/zero"}, "TLS ca_file /dev/zero: not a regular file"),
                      ({"ca_file": str(tmp_path)}, "not a regular file")):
        with pytest.raises(BadInput, match=words):
            make_client(parse_broker("mqtts://broker"), "dev1", **kw)
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(BadInput, match="TLS cert_file .* larger than 64 KB"):
        make_client(parse_broker("mqtts://broker"), "dev1", cert_file=str(big), key_file=str(big))



def test_a_client_certificate_for_a_plain_broker_is_said_not_refused(tmp_path, caplog):
    """It was dropped without a word; refusing it would stop a device whose config ran before an upgrade."""
    import logging

    with caplog.at_level(logging.WARNING, logger="lepton_edge.telemetry.broker"):
        make_client(parse_broker("mqtt://broker"), "dev1", cert_file=str(tmp_path / "c.pem"))
    assert any("cert_file/key_file are set but the broker URL has no TLS" in r.getMessage() for r in caplog.records)


def test_credentials_past_mqtts_limit_are_refused_and_passwords_never_printed():
    """A 70,000-byte password killed paho's network thread (struct.error packing the CONNECT): the agent ran on,
    offline for good. And the agent logged its broker URL, password included, to the journal at every start."""
    from lepton_edge.telemetry.broker import redacted

    long = "p" * 65536
    with pytest.raises(BadInput, match="password is over MQTT's 65535 bytes"):
        parse_broker(f"mqtt://u:{long}@broker")
    with pytest.raises(BadInput, match="user name is over"):
        make_client(parse_broker("mqtt://broker"), "dev1", username="é" * 32768)  # 65,536 bytes in UTF-8
    make_client(parse_broker("mqtt://broker"), "dev1", username="u", password="p" * 65535)  # the limit itself
    assert redacted("mqtt://dev:s3cret@broker:1884/x") == "mqtt://dev:***@broker:1884/x"
    assert redacted("mqtts://broker:8883") == "mqtts://broker:8883" and redacted("broker") == "broker"
    assert "s3cret" not in redacted("mqtt://[bad@s3cret")
    with pytest.raises(BadInput) as e:
        parse_broker("http://dev:s3cret@broker")
    assert "s3cret" not in str(e.value) and "dev:***@broker" in str(e.value)


def test_credentials_mqtt_cannot_carry_are_one_line():
    """A NUL in the user name: the broker refused each CONNECT and the agent reconnected forever, silent. A user
    name that is not UTF-8 (a shell's `$'\\xff'` reaches Python as a lone surrogate) was a traceback."""
    for user, words in (("a\x00b", r"U\+0000"), ("\udcff", "user name is not valid UTF-8")):
        with pytest.raises(BadInput, match=words):
            make_client(parse_broker("mqtt://broker"), "dev1", username=user, password="p")
    with pytest.raises(BadInput, match="password is not valid UTF-8"):
        make_client(parse_broker("mqtt://broker"), "dev1", username="u", password="\udcff")
    with pytest.raises(BadInput, match="U\\+0000"):
        parse_broker("mqtt://a%00b:pw@broker")
    c = make_client(parse_broker("mqtt://broker"), "dev1", username="u", password="p\x00q")  # binary in MQTT
    assert c.password == "p\x00q"


def test_flags_win_over_credentials_in_the_url():
    c = make_client(parse_broker("mqtt://urluser:urlpw@broker"), "dev1", username="flaguser", password="flagpw")
    assert (c.username, c.password) == ("flaguser", "flagpw")
    c = make_client(parse_broker("mqtt://urluser:urlpw@broker"), "dev1")
    assert (c.username, c.password) == ("urluser", "urlpw")
