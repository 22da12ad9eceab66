"""Device health for telemetry: CPU, memory, temperature, Raspberry Pi throttling.

Why each source: psutil for CPU and RSS (portable); /sys/class/thermal for temperature (every
Linux board with a sensor exposes it there); `vcgencmd get_throttled` where it exists, because a
throttled Pi explains a latency rise better than any model change.
"""
from __future__ import annotations

import glob
import shutil
import subprocess


class Health:
    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # the first call starts the measurement interval
        psutil.cpu_percent(None)
        self._psutil = psutil
        self._vcgencmd = shutil.which("vcgencmd")

    def sample(self) -> dict:
        out = {"cpu_percent": self._proc.cpu_percent(None), "system_cpu_percent": self._psutil.cpu_percent(None),
               "rss_bytes": self._proc.memory_info().rss, "temperature_c": temperature_c()}
        if self._vcgencmd:
            out["throttled"] = throttled(self._vcgencmd)
        return out


def temperature_c() -> float | None:
    """The hottest thermal zone in degrees Celsius, or None where the board has no sensor. A zone reading
    outside what the telemetry schema accepts (-273.15 to 1000 °C) is left out: some drivers report an
    unreadable sensor as INT_MAX millidegrees, and one such zone would make every window invalid."""
    temps = []
    for f in glob.glob("/sys/class/thermal/thermal_zone*/temp"):
        try:
            with open(f) as fh:
                t = int(fh.read().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if -273.15 <= t <= 1000:
            temps.append(t)
    return max(temps) if temps else None


def throttled(vcgencmd: str) -> str | None:
    """'0x0' when all is well; bits: under-voltage, frequency capped, throttled, soft temp limit."""
    try:
        out = subprocess.run([vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().split("=", 1)[-1] or None
