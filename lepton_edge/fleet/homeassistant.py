"""Home Assistant MQTT discovery for the fleet (opt-in: `lepton-edge monitor --homeassistant`).

Why the monitor and not the agent: devices know nothing of Home Assistant (like Zigbee2MQTT's
bridge), and one service that already reads every device is the natural place to announce them.
Home Assistant then reads each device's OWN topics: sensors take their values from the retained
`status` and the `telemetry` windows with value templates, so the monitor publishes one retained
config per device and nothing per window.

Device-based discovery (Home Assistant 2024.11+): one retained message on
`<prefix>/device/<id>/config` carrying `dev`, `o` and `cmps`. Keys use Home Assistant's documented
abbreviations throughout (dev, o, cmps, p, uniq_id, stat_t, val_tpl, avty...), consistently, to keep
a thousand retained configs small. Republished when `<prefix>/status` says `online` (Home
Assistant's birth message), removed with an empty retained payload when a device is forgotten.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time

from lepton_edge import __version__
from lepton_edge.telemetry.topics import Topics

ORIGIN_URL = "https://pypi.org/project/lepton-edge/"
DEFAULT_WINDOW_S = 10.0

# Availability from the device's retained status ({"online": true} / Last Will {"online": false}).
_AVAILABILITY_TPL = "{{ 'online' if value_json.online else 'offline' }}"


def ha_id(fleet: str, device: str) -> str:
    """The discovery object id: [a-zA-Z0-9_-] only (Home Assistant's rule), one per device. Topic segments
    may hold '.' and '_', so a name that had to change, or holds the separator, gets a short hash to stay
    unique; plain names (lab/cam-1) keep the readable lepton_lab_cam-1."""
    raw = f"lepton_{fleet}_{device}"
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", raw)
    if "_" in fleet or "_" in device:
        # '_' is both the separator and a segment character: plant_a/cam1 and plant/a_cam1 were one id (one
        # device missing from HA, and forgetting one removed the other's); the pair itself is hashed
        safe += "_" + hashlib.sha1(f"{fleet}/{device}".encode()).hexdigest()[:8]
    elif safe != raw:
        safe += "_" + hashlib.sha1(raw.encode()).hexdigest()[:6]
    return safe


def legacy_ha_id(fleet: str, device: str) -> str:
    """ha_id before names holding '_' were hashed (kept to clear those retained configs on upgrade)."""
    raw = f"lepton_{fleet}_{device}"
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", raw)
    return safe + "_" + hashlib.sha1(raw.encode()).hexdigest()[:6] if safe != raw else safe


_HASHED_TAIL = re.compile(r"_(?:[0-9a-f]{6}|[0-9a-f]{8})$")  # how ha_id ends when it hashed the name


def legacy_id_to_clear(fleet: str, device: str) -> str | None:
    """The old id whose retained config an upgrade (or `fleet forget`) empties, or None: the id did not
    change, or the old one ends as a hashed current id does and so may be another device's.
    Why: a device can pick its name; lab/cam-1_v2_d56431 has the old, unhashed id
    lepton_lab_cam-1_v2_d56431, which is the current id of lab/cam-1.v2, and clearing it deleted that
    device from Home Assistant (and the bridge, its config unchanged, never sent it again). The cost:
    a device whose old id was its plain name, ending in six or eight hex digits after '_', keeps its
    pre-upgrade duplicate."""
    old = legacy_ha_id(fleet, device)
    if old == ha_id(fleet, device):
        return None
    if old == f"lepton_{fleet}_{device}" and _HASHED_TAIL.search(old):  # unhashed, yet shaped as a hashed id
        return None  # (an old id that got its own hash would need a SHA-1 prefix collision to be another's)
    return old


def _sensor(uid: str, name: str, tpl: str, availability: list, expire_after: int, *, unit: str | None = None,
            device_class: str | None = None, icon: str | None = None, precision: int | None = None) -> dict:
    c = {"p": "sensor", "name": name, "uniq_id": uid, "val_tpl": tpl, "stat_cla": "measurement",
         "avty": availability, "exp_aft": expire_after}
    if unit:
        c["unit_of_meas"] = unit
    if device_class:
        c["dev_cla"] = device_class
    if icon:
        c["ic"] = icon
    if precision is not None:
        c["sug_dsp_prc"] = precision
    return c


def discovery_payload(state, window_s: float | None = None) -> dict:
    """The device-based discovery config for one DeviceState (abbreviated keys)."""
    topics = Topics(state.fleet, state.device)
    oid = ha_id(state.fleet, state.device)
    window = float(window_s or getattr(state, "window_s", None) or DEFAULT_WINDOW_S)
    expire = max(30, int(round(3 * window)))  # three windows without telemetry: the values are stale
    avty = [{"t": topics.status, "val_tpl": _AVAILABILITY_TPL, "pl_avail": "online", "pl_not_avail": "offline"}]
    model = " ".join(x for x in (state.bundle_name, state.precision, state.backend) if x) or "lepton-edge agent"
    dev = {"ids": [oid], "name": f"{state.fleet}/{state.device}", "mf": "lepton-edge", "mdl": model}
    if state.software:
        dev["sw"] = state.software
    cmps = {
        "fps": _sensor(f"{oid}_fps", "FPS", "{{ value_json.fps }}", avty, expire, unit="fps", icon="mdi:speedometer",
                       precision=1),
        "inference_p95": _sensor(f"{oid}_inference_p95", "Inference p95",
                                 "{{ value_json.latency_ms.inference.p95 if value_json.latency_ms.inference is "
                                 "defined else None }}", avty, expire, unit="ms", device_class="duration",
                                 precision=1),
        "temperature": _sensor(f"{oid}_temperature", "Temperature", "{{ value_json.temperature_c }}", avty, expire,
                               unit="°C", device_class="temperature", precision=1),
        "cpu": _sensor(f"{oid}_cpu", "CPU", "{{ value_json.cpu_percent }}", avty, expire, unit="%",
                       icon="mdi:cpu-64-bit", precision=0),
        "rss": _sensor(f"{oid}_rss", "Memory (RSS)", "{{ value_json.rss_bytes }}", avty, expire, unit="B",
                       device_class="data_size", precision=0),
        # Always available (no avty): offline is its own state here, not "unavailable".
        "online": {"p": "binary_sensor", "name": "Online", "uniq_id": f"{oid}_online", "dev_cla": "connectivity",
                   "stat_t": topics.status, "val_tpl": "{{ 'ON' if value_json.online else 'OFF' }}",
                   "pl_on": "ON", "pl_off": "OFF"},
    }
    return {"dev": dev, "o": {"name": "lepton-edge monitor", "sw": __version__, "url": ORIGIN_URL},
            "cmps": cmps, "stat_t": topics.telemetry, "qos": 1}


class HomeAssistantBridge:
    """Publishes discovery for every device in the store over the monitor's MQTT client.

    Use it as the Monitor's `on_change` (it receives the set of (fleet, device) touched by each
    stored batch): the calling thread only records the set; one worker thread reads the store once
    per `interval_s` when something changed, and publishes only configs that differ from the last
    one sent, so a thousand devices sending windows cost one query every interval, not one per
    window. Devices that disappeared from the store (forgotten) get an empty retained config.
    Home Assistant's birth message (`<prefix>/status` = online) resends every config."""

    def __init__(self, client, store, prefix: str = "homeassistant", *, window_s: float | None = None,
                 qos: int = 1, interval_s: float = 2.0, full_sync_s: float = 60.0, birth_gap_s: float = 30.0):
        """birth_gap_s: at most one resend of every config per this many seconds, however many birth messages
        come (a later one waits for the gap, it is not lost). Why: anyone who may publish on the broker may
        publish `<prefix>/status` = online, and 91 of them in 10 s had the bridge republish 44,000 retained
        configs for 500 devices."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", prefix or ""):
            from lepton_edge.errors import BadInput

            raise BadInput(f"Home Assistant discovery prefix {prefix!r}: letters, digits, '_' and '-' only")
        self.client, self.store, self.prefix, self.window_s, self.qos = client, store, prefix, window_s, qos
        self.interval_s, self.full_sync_s, self.birth_gap_s = interval_s, full_sync_s, birth_gap_s
        self._published: dict[tuple[str, str], str] = {}  # what this bridge last sent, to skip repeats
        self._pending: set[tuple[str, str]] = set()
        self._birth = False
        self._subscribed = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # ---- topics -------------------------------------------------------------------------------
    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/status"

    def config_topic(self, fleet: str, device: str) -> str:
        return f"{self.prefix}/device/{ha_id(fleet, device)}/config"

    def legacy_topic(self, fleet: str, device: str) -> str | None:
        """The config topic lepton-edge used before ha_id hashed names holding '_', to empty (None: none
        to clear; see legacy_id_to_clear)."""
        old = legacy_id_to_clear(fleet, device)
        return None if old is None else f"{self.prefix}/device/{old}/config"

    # ---- wiring -------------------------------------------------------------------------------
    def attach(self) -> HomeAssistantBridge:
        """Route Home Assistant's birth topic to this bridge and start the worker thread."""
        self.client.message_callback_add(self.status_topic, self._on_ha_status)
        self.subscribe()
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="ha-discovery", daemon=True)
            self._worker.start()
        return self

    def subscribe(self) -> bool:
        """QoS 0 (HA's birth is QoS 0): nothing to acknowledge on a monitor that acks by hand. Retried
        by the worker until the client is connected; the persistent session keeps it afterwards."""
        import paho.mqtt.client as mqtt

        rc, _ = self.client.subscribe(self.status_topic, qos=0)
        self._subscribed = rc == mqtt.MQTT_ERR_SUCCESS
        return self._subscribed

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=5)
            self._worker = None
        try:
            self.client.message_callback_remove(self.status_topic)
        except Exception:  # noqa: BLE001 - a client already torn down
            pass

    def __call__(self, changed) -> None:
        """The Monitor's on_change: remember which devices to look at; the worker does the rest."""
        with self._lock:
            self._pending.update(changed)

    def _on_ha_status(self, client, userdata, msg) -> None:
        if msg.payload[:16].strip().lower() == b"online":
            self._birth = True
            self._wake.set()

    def _run(self) -> None:
        from lepton_edge.fleet.store.base import StoreError

        next_full = next_birth = 0.0
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            with self._lock:
                pending, self._pending = self._pending, set()
            birth, self._birth = self._birth, False
            if birth and now < next_birth:  # too soon after the last resend: kept for a later pass
                self._birth, birth = True, False
            if not (pending or birth or now >= next_full):
                continue
            try:
                if now >= next_full or not self._subscribed:
                    self.subscribe()
                self.sync(force=birth)
                next_full = now + self.full_sync_s
                if birth:
                    next_birth = now + self.birth_gap_s
            except StoreError:
                with self._lock:  # try again next interval
                    self._pending |= pending
                self._birth = self._birth or birth
            except Exception:  # noqa: BLE001 - a view's failure must not end the bridge
                pass

    # ---- publishing ---------------------------------------------------------------------------
    def sync(self, force: bool = False) -> int:
        """One read of the store: publish new or changed configs (all of them with force), remove the
        devices the store no longer has. Returns the number of messages sent."""
        states = {(d.fleet, d.device): d for d in self.store.devices()}
        sent = sum(self._publish(d, force) for d in states.values())
        with self._lock:
            gone = [k for k in self._published if k not in states]
        return sent + sum(self.remove(*k) for k in gone)

    def device_changed(self, fleet: str, device: str) -> bool:
        """Publish this device's config now if it changed; remove it if the store forgot it. True if sent."""
        state = self.store.device(fleet, device)
        if state is None:
            return self.remove(fleet, device)
        return self._publish(state, force=False)

    def publish_all(self, force: bool = True) -> int:
        """Every device in the store (Home Assistant restarted: force resends unchanged configs)."""
        return sum(self._publish(d, force=force) for d in self.store.devices())

    def remove(self, fleet: str, device: str) -> bool:
        """An empty retained payload deletes the device and its entities in Home Assistant."""
        with self._lock:
            self._published.pop((fleet, device), None)
        self.client.publish(self.config_topic(fleet, device), b"", qos=self.qos, retain=True)
        if (legacy := self.legacy_topic(fleet, device)) is not None:
            self.client.publish(legacy, b"", qos=self.qos, retain=True)
        return True

    def _publish(self, state, force: bool) -> bool:
        body = json.dumps(discovery_payload(state, self.window_s), separators=(",", ":"), sort_keys=True)
        key = (state.fleet, state.device)
        with self._lock:
            if not force and self._published.get(key) == body:
                return False
            first = key not in self._published
            self._published[key] = body
        legacy = self.legacy_topic(state.fleet, state.device) if first else None
        if legacy:  # an upgrade: the old id's retained config would stay as a duplicate device in HA
            self.client.publish(legacy, b"", qos=self.qos, retain=True)
        self.client.publish(self.config_topic(state.fleet, state.device), body, qos=self.qos, retain=True)
        return True
