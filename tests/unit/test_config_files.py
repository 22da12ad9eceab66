"""Hand-written TOML from outside (agent.toml, target profiles, alert rules: lepton_edge/tomlfile.py) within a
time budget as well as a size one, and the agent.toml the Pi kit writes read back as the device reads it."""
from __future__ import annotations

import time

import pytest

from lepton_edge.errors import BadInput
from lepton_edge.tomlfile import MAX_DOTS_PER_LINE, MAX_TOML_BYTES, loads


def test_a_long_dotted_key_is_refused_before_the_parser_spends_minutes_on_it():
    """tomllib's time grows faster than a dotted key's parts: 16,000 parts (32 KB) took 3 s, a 1 MB key did
    not end in 3 minutes, though the size cap passed it."""
    key = ".".join(["a"] * 500_000)
    t = time.monotonic()
    with pytest.raises(BadInput, match=f"line 2 has more than {MAX_DOTS_PER_LINE} dots"):
        loads(f"ok = 1\n{key} = 1\n".encode(), "agent.toml", "agent config")
    with pytest.raises(BadInput, match="line 1 has more than"):
        loads(f"[{key}]\n".encode(), "p.toml", "target profile")
    assert time.monotonic() - t < 2
    # the budget's worst case: a whole file of keys just under the limit parses within a few seconds
    line = ".".join(["a"] * (MAX_DOTS_PER_LINE - 1)) + ".b{} = 1\n"
    doc = "".join(line.format(i) for i in range(MAX_TOML_BYTES // len(line)))[:MAX_TOML_BYTES]
    doc = doc[:doc.rfind("\n") + 1]
    t = time.monotonic()
    assert len(loads(doc.encode(), "agent.toml", "agent config")["a"]) == 1
    assert time.monotonic() - t < 5
    # dots where real files have them: values, floats, URLs, comments
    assert loads(b'broker = "mqtts://broker.example.com:8883"  # a.b.c\nmean = [0.5, 0.5, 0.5]\na.b.c = 1\n',
                 "agent.toml", "agent config")["a"] == {"b": {"c": 1}}


def test_an_integer_past_pythons_digit_limit_is_one_line():
    with pytest.raises(BadInput, match="agent.toml: a value this parser cannot hold .*integer string conversion"):
        loads(("threads = " + "9" * 5000).encode(), "agent.toml", "agent config")


@pytest.mark.parametrize("value", ["/home/pi/clips/café-😀.mp4", 'a"b\\c', "x\x01\x7fy\ttab", "rtsp://u:p@cam/ch1"])
def test_the_kits_agent_toml_reads_back_every_value_as_given(value):
    """JSON's escapes are not all TOML's: an emoji in a video's name became a surrogate pair, and the agent on the
    Pi refused the agent.toml the kit had just built (exit 2 at every start of the service)."""
    import tomllib

    from lepton_edge.kit import AgentSettings, _check_rendered

    s = AgentSettings(source=value, fleet="lab", device_id="pi-1")
    text = s.render([])
    _check_rendered(text, s)
    assert tomllib.loads(text)["source"] == value


def test_relative_paths_in_agent_toml_are_read_from_its_own_folder(tmp_path, monkeypatch):
    """Under systemd the working directory is /, and install.sh's upgrade check runs in the kit's folder:
    a relative path meant a different file to each. Now the file's folder, for the file's values; a flag
    stays the shell's (relative to where it is typed)."""
    from pathlib import Path

    from lepton_edge.agent.config import load

    conf = tmp_path / "etc" / "agent.toml"
    conf.parent.mkdir()
    conf.write_text('state_dir = "state"\nbundle = "../bundles/b"\ntrusted_keys = ["trusted/k.pem", "/abs/k.pem"]\n'
                    'ca_file = "/etc/ssl/ca.pem"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(conf, {})
    assert cfg.state_dir == conf.parent / "state" and cfg.bundle == conf.parent / "../bundles/b"
    assert cfg.trusted_keys == [conf.parent / "trusted/k.pem", Path("/abs/k.pem")]
    assert cfg.ca_file == Path("/etc/ssl/ca.pem")
    assert load(conf, {"state_dir": Path("flag-state")}).state_dir == Path("flag-state")
    conf.write_text('trusted_keys = "k.pem"\n')  # a wrong type is still the validator's line
    with pytest.raises(BadInput, match="field 'trusted_keys'"):
        load(conf, {})


@pytest.mark.parametrize("line, field", [("threads = true", "threads"), ("loop = 1", "loop"),
                                         ('window_s = "10"', "window_s"), ("sample_every = 2.0", "sample_every"),
                                         ('outbox_fsync = "yes"', "outbox_fsync"), ("health_timeout_s = false",
                                                                                   "health_timeout_s")])
def test_a_value_of_another_type_in_agent_toml_is_named_not_converted(tmp_path, line, field):
    """`threads = true` ran one thread, `loop = 1` looped and `window_s = "10"` was ten seconds, without a word;
    the set command refused the same values. A value of another type is now the field's one line."""
    from lepton_edge.agent.config import load

    conf = tmp_path / "agent.toml"
    conf.write_text(line + "\n")
    with pytest.raises(BadInput, match=f"field '{field}'"):
        load(conf, {})
    conf.write_text("threads = 2\nloop = true\nwindow_s = 10\nhealth_timeout_s = 2.5\n")  # their own types
    cfg = load(conf, {})
    assert (cfg.threads, cfg.loop, cfg.window_s, cfg.health_timeout_s) == (2, True, 10.0, 2.5)
