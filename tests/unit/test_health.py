"""The device's health sample as the agent puts it into every telemetry window: a sensor reading the
schema would refuse must not make the window invalid."""
from __future__ import annotations

from lepton_edge.telemetry import health
from lepton_edge.telemetry.schema import Telemetry


def test_an_implausible_thermal_zone_is_left_out_not_sent(tmp_path, monkeypatch):
    """Some drivers report an unreadable sensor as INT_MAX millidegrees (or far below absolute zero): the
    hottest zone then was 2,147,483 °C, over the schema's bound, and every window the agent built was
    invalid. Such a zone is left out; a board with only such zones reports no temperature."""
    zones = []
    for i, raw in enumerate(["2147483647", "45000", "-274000", "bad", "51500"]):
        f = tmp_path / f"thermal_zone{i}" / "temp"
        f.parent.mkdir()
        f.write_text(raw + "\n")
        zones.append(str(f))
    monkeypatch.setattr(health.glob, "glob", lambda pattern: zones)
    assert health.temperature_c() == 51.5
    window = {"boot_id": "b", "seq": 0, "window_s": 10.0, "frames": 1, "fps": 0.1,
              "temperature_c": health.temperature_c()}
    Telemetry.model_validate(window)
    monkeypatch.setattr(health.glob, "glob", lambda pattern: zones[:1] + zones[2:3])
    assert health.temperature_c() is None
