"""Home Assistant MQTT discovery: the retained device-based config a stock subscriber sees on a real
mosquitto, checked field by field against Home Assistant's documented schema (MQTT integration docs,
"Device discovery payload", "Using Availability topics" and the abbreviation tables), its value
templates rendered against the agent's real payloads, republished on HA's birth message and
removed when the device is forgotten."""
from __future__ import annotations

import json
import re
import time

import jinja2
import paho.mqtt.client as mqtt
import pytest

from fleet_views_data import add_device, window
from lepton_edge import __version__
from lepton_edge.fleet.homeassistant import HomeAssistantBridge, ha_id
from lepton_edge.fleet.store import open_store
from lepton_edge.telemetry.topics import Topics
from mqtt_helpers import Recorder

# Home Assistant's documented abbreviations (integrations/mqtt: "Supported abbreviations in MQTT
# discovery messages", "... for device registry configuration", "... for origin info").
ABBREVIATIONS = {"avty": "availability", "cmps": "components", "dev": "device", "dev_cla": "device_class",
                 "exp_aft": "expire_after", "ic": "icon", "o": "origin", "p": "platform", "pl_avail":
                 "payload_available", "pl_not_avail": "payload_not_available", "pl_off": "payload_off",
                 "pl_on": "payload_on", "stat_cla": "state_class", "stat_t": "state_topic",
                 "sug_dsp_prc": "suggested_display_precision", "t": "topic", "uniq_id": "unique_id",
                 "unit_of_meas": "unit_of_measurement", "val_tpl": "value_template"}
DEVICE_ABBREVIATIONS = {"ids": "identifiers", "mf": "manufacturer", "mdl": "model", "sw": "sw_version",
                        "name": "name", "hw": "hw_version", "sn": "serial_number"}
ORIGIN_ABBREVIATIONS = {"name": "name", "sw": "sw_version", "url": "support_url"}
ROOT_OPTIONS = {"device", "origin", "components", "state_topic", "qos"}  # documented shared options we use


def expand(cfg: dict) -> dict:
    """Abbreviated discovery payload -> full option names; fails on a key HA does not document."""
    def keys(d: dict, table: dict) -> dict:
        out = {}
        for k, v in d.items():
            full = table.get(k, k)
            assert full == k or k not in table.values(), f"{k!r} mixes abbreviated and full names"
            out[full] = v
        return out

    full = keys(cfg, ABBREVIATIONS)
    full["device"] = keys(full["device"], DEVICE_ABBREVIATIONS)
    full["origin"] = keys(full["origin"], ORIGIN_ABBREVIATIONS)
    full["components"] = {cid: keys(c, ABBREVIATIONS) for cid, c in full["components"].items()}
    for c in full["components"].values():
        if "availability" in c:
            c["availability"] = [keys(a, ABBREVIATIONS) for a in c["availability"]]
    return full


def render(template: str, payload: dict) -> str:
    """A value template as Home Assistant renders it (Jinja2, `value_json` = the parsed payload)."""
    return jinja2.Environment().from_string(template).render(value_json=payload, value=json.dumps(payload)).strip()


@pytest.fixture
def bridge_env(mosquitto, tmp_path):
    store = open_store(tmp_path / "fleet.sqlite")
    add_device(store, "lab", "cam-1.v2", fps=29.5, p95=12.5, temp=48.0)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="monitor-ha")
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    bridge = HomeAssistantBridge(c, store, window_s=2.0).attach()
    yield store, bridge, c
    bridge.close()
    c.loop_stop()
    c.disconnect()
    store.close()


def _configs(rec: Recorder, topic: str) -> list:
    with rec.lock:
        return [(b, r) for t, b, r in rec.messages if t == topic]


def test_discovery_payload_follows_documented_schema(bridge_env, mosquitto):
    store, bridge, _ = bridge_env
    assert bridge.device_changed("lab", "cam-1.v2") is True
    oid = ha_id("lab", "cam-1.v2")
    assert oid.startswith("lepton_lab_cam-1_v2_") and all(ch.isalnum() or ch in "_-" for ch in oid)
    topic = f"homeassistant/device/{oid}/config"
    # the bridge publishes in the background: once a first subscriber has seen the config, the broker
    # holds it, and a subscriber that comes after must get it as a retained message
    probe = Recorder(mosquitto.port, client_id="ha-probe", topic="homeassistant/#")
    try:
        assert probe.wait_for(lambda r: _configs(r, topic), timeout=10), "no discovery config on the broker"
    finally:
        probe.close()
    rec = Recorder(mosquitto.port, client_id="ha-sub", topic="homeassistant/#")  # subscribes after: retained
    try:
        got = rec.wait_for(lambda r: _configs(r, topic), timeout=10)
    finally:
        rec.close()
    assert got, "no discovery config on the broker"
    raw, retained = got[0]
    assert retained is True
    cfg = expand(raw)
    t = Topics("lab", "cam-1.v2")

    assert set(cfg) == ROOT_OPTIONS
    assert cfg["qos"] == 1 and cfg["state_topic"] == t.telemetry
    dev = cfg["device"]
    assert dev["identifiers"] == [oid] and dev["name"] == "lab/cam-1.v2"
    assert dev["manufacturer"] == "lepton-edge" and dev["model"] == "fashion-cnn int8 onnxruntime"
    assert dev["sw_version"] == "0.1.0"
    assert cfg["origin"] == {"name": "lepton-edge monitor", "sw_version": __version__,
                             "support_url": "https://pypi.org/project/lepton-edge/"}

    cmps = cfg["components"]
    assert set(cmps) == {"fps", "inference_p95", "temperature", "cpu", "rss", "online"}
    uids = [c["unique_id"] for c in cmps.values()]
    assert len(set(uids)) == len(uids) and all(u.startswith(oid) for u in uids)
    sensors = {k: c for k, c in cmps.items() if c["platform"] == "sensor"}
    assert set(sensors) == {"fps", "inference_p95", "temperature", "cpu", "rss"}
    for c in sensors.values():
        assert c["expire_after"] == 30  # max(30 s, 3 windows of 2 s)
        assert c["state_class"] == "measurement"
        (av,) = c["availability"]
        assert av["topic"] == t.status and av["payload_available"] == "online"
        assert av["payload_not_available"] == "offline"
        assert render(av["value_template"], {"v": 1, "online": True, "boot_id": "b"}) == "online"
        assert render(av["value_template"], {"v": 1, "online": False, "boot_id": "b"}) == "offline"
    assert sensors["temperature"]["device_class"] == "temperature"
    assert sensors["temperature"]["unit_of_measurement"] == "°C"
    assert sensors["inference_p95"]["device_class"] == "duration"
    assert sensors["inference_p95"]["unit_of_measurement"] == "ms"
    assert sensors["rss"]["device_class"] == "data_size" and sensors["rss"]["unit_of_measurement"] == "B"

    # The templates read the agent's real telemetry window (state_topic shared at the root).
    w = window("boot-x", 7, 29.5, 12.5, temp=48.0)
    assert float(render(sensors["fps"]["value_template"], w)) == 29.5
    assert float(render(sensors["inference_p95"]["value_template"], w)) == 12.5
    assert float(render(sensors["temperature"]["value_template"], w)) == 48.0
    assert float(render(sensors["cpu"]["value_template"], w)) == 37.5
    assert int(render(sensors["rss"]["value_template"], w)) == 150 * 2**20
    w_bare = {**w, "latency_ms": {}, "temperature_c": None}
    assert render(sensors["inference_p95"]["value_template"], w_bare) == "None"  # HA: unknown, not an error
    assert render(sensors["temperature"]["value_template"], w_bare) == "None"

    online = cmps["online"]
    assert online["platform"] == "binary_sensor" and online["device_class"] == "connectivity"
    assert online["state_topic"] == t.status and "availability" not in online
    assert render(online["value_template"], {"online": True}) == online["payload_on"]
    assert render(online["value_template"], {"online": False}) == online["payload_off"]


def test_republished_on_birth_only_when_changed_and_removed_when_forgotten(bridge_env, mosquitto):
    store, bridge, client = bridge_env
    oid = ha_id("lab", "cam-1.v2")
    topic = f"homeassistant/device/{oid}/config"
    rec = Recorder(mosquitto.port, client_id="ha-sub2", topic="homeassistant/#")
    try:
        assert bridge.device_changed("lab", "cam-1.v2") is True
        assert rec.wait_for(lambda r: len(_configs(r, topic)) == 1, timeout=10)
        # Unchanged: nothing goes out again.
        assert bridge.device_changed("lab", "cam-1.v2") is False
        # Home Assistant restarts: its birth message makes the bridge resend every config.
        client.publish("homeassistant/status", "online", qos=1)
        assert rec.wait_for(lambda r: len(_configs(r, topic)) == 2, timeout=10)
        client.publish("homeassistant/status", "offline", qos=1)  # HA's Last Will: nothing to do
        # A changed device (new bundle in meta) is republished.
        from fleet_views_data import meta
        store.set_meta("lab", "cam-1.v2", meta("boot-cam-1.v2", bundle="fashion-cnn-v2"), time.time())
        assert bridge.device_changed("lab", "cam-1.v2") is True
        got = rec.wait_for(lambda r: len(_configs(r, topic)) >= 3 and _configs(r, topic), timeout=10)
        assert got[-1][0]["dev"]["mdl"].startswith("fashion-cnn-v2")
        assert len(_configs(rec, topic)) == 3  # the offline birth did not trigger a resend
        # Forgotten: an empty retained payload removes the device in Home Assistant...
        add_device(store, "lab", "cam-2")
        assert bridge.device_changed("lab", "cam-2") is True
        store.forget("lab", "cam-1.v2")
        assert bridge.device_changed("lab", "cam-1.v2") is True
        assert rec.wait_for(lambda r: any(b == "" for b, _ in _configs(r, topic)), timeout=10)
    finally:
        rec.close()
    # ...and clears the retained config: a new subscriber gets nothing on that topic.
    late = Recorder(mosquitto.port, client_id="ha-late", topic="homeassistant/#")
    other = f"homeassistant/device/{ha_id('lab', 'cam-2')}/config"
    try:
        # The retained messages of one subscription come together: once cam-2's is here, cam-1's would be.
        assert late.wait_for(lambda r: _configs(r, other), timeout=10)
        assert _configs(late, topic) == []
    finally:
        late.close()


def test_bad_prefix_is_one_line(tmp_path):
    from lepton_edge.errors import BadInput

    with pytest.raises(BadInput, match="prefix"):
        HomeAssistantBridge(None, None, prefix="home/#")


def test_monitor_drives_the_bridge_from_real_telemetry(mosquitto, tmp_path):
    """The real Monitor ingests an agent's retained status/meta and a window; the bridge (its on_change)
    announces the device; HA's birth (QoS 1 here) is handled although the monitor acks by hand."""
    from fleet_views_data import meta
    from lepton_edge.fleet.monitor import Monitor
    from lepton_edge.telemetry.schema import Status

    store = open_store(tmp_path / "fleet.sqlite")
    mon = Monitor(mosquitto.url, store, client_id="mon-ha", log=lambda line: None)
    bridge = HomeAssistantBridge(mon.client, store, window_s=2.0, interval_s=0.1)
    mon.on_change = bridge
    topic = f"homeassistant/device/{ha_id('lab', 'pi-7')}/config"
    rec = Recorder(mosquitto.port, client_id="ha-sub3", topic="homeassistant/#")
    dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-7")
    try:
        mon.start()
        assert mon.connected.wait(10)
        bridge.attach()
        dev.connect("127.0.0.1", mosquitto.port)
        dev.loop_start()
        t = Topics("lab", "pi-7")
        # A status before any meta (CI once stored them in that order): the device is announced with the
        # generic model, and the meta's arrival must send its config again with the bundle's model.
        dev.publish(t.status, Status(online=True, boot_id="b7").model_dump_json(), qos=1, retain=True)
        assert rec.wait_for(lambda r: _configs(r, topic), timeout=15)
        assert _configs(rec, topic)[0][0]["dev"]["mdl"] == "lepton-edge agent"
        dev.publish(t.meta, json.dumps(meta("b7")), qos=1, retain=True)
        dev.publish(t.telemetry, json.dumps(window("b7", 0, 20.0, 9.0)), qos=1)
        model = "fashion-cnn int8 onnxruntime"
        assert rec.wait_for(lambda r: [b for b, _ in _configs(r, topic) if b and b["dev"]["mdl"] == model],
                            timeout=15)
        assert mon.wait_idle(10)
        time.sleep(0.3)  # the bridge's interval: a config still on its way is counted below
        assert _configs(rec, topic)[-1][0]["dev"]["mdl"] == model
        n = len(_configs(rec, topic))
        dev.publish(t.telemetry, json.dumps(window("b7", 1, 21.0, 9.5)), qos=1)  # same config: not resent
        assert mon.wait_idle(10)
        dev.publish("homeassistant/status", "online", qos=1)
        assert rec.wait_for(lambda r: len(_configs(r, topic)) == n + 1, timeout=10)
        # The monitor kept ingesting after the birth message (nothing stuck unacknowledged).
        dev.publish(t.telemetry, json.dumps(window("b7", 2, 22.0, 9.5)), qos=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and store.device("lab", "pi-7").windows < 3:
            time.sleep(0.05)
        assert store.device("lab", "pi-7").windows == 3
        # Forgotten in the store: the next pass of the bridge removes it from Home Assistant.
        store.forget("lab", "pi-7")
        bridge.sync()
        assert rec.wait_for(lambda r: any(b == "" for b, _ in _configs(r, topic)), timeout=10)
    finally:
        dev.loop_stop()
        dev.disconnect()
        bridge.close()
        mon.stop()
        rec.close()
        store.close()


def test_discovery_ids_are_one_per_device():
    """`_` is a segment character and the id's separator: plant_a/cam1 and plant/a_cam1 were one HA device."""
    names = [("plant_a", "cam1"), ("plant", "a_cam1"), ("plant", "a.cam1"), ("plant", "a-cam1"), ("lab", "cam-1.v2"),
             ("lab", "cam-1_v2"), ("a_b", "c_d"), ("a", "b_c_d"), ("a_b_c", "d")]
    ids = [ha_id(f, d) for f, d in names]
    assert len(set(ids)) == len(ids), ids
    assert ha_id("lab", "cam-1") == "lepton_lab_cam-1"  # plain names keep their readable id
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)


def test_an_upgrade_clears_the_config_under_the_old_id():
    """Names holding '_' changed id: the old retained config would stay in HA as a duplicate device."""
    from lepton_edge.fleet.forget import retained_topics
    from lepton_edge.fleet.homeassistant import legacy_ha_id

    assert legacy_ha_id("lab", "cam_1") == "lepton_lab_cam_1" != ha_id("lab", "cam_1")
    assert legacy_ha_id("lab", "cam-1.v2") == ha_id("lab", "cam-1.v2")  # unchanged names: nothing to clear
    topics = retained_topics("lab", "cam_1")
    assert "homeassistant/device/lepton_lab_cam_1/config" in topics
    assert f"homeassistant/device/{ha_id('lab', 'cam_1')}/config" in topics


def test_an_upgraded_monitor_clears_the_old_retained_config_when_it_publishes(bridge_env, mosquitto):
    """A device named with '_' that an older monitor announced under its unhashed id: the first publish
    of this monitor empties that retained config (else HA shows the device twice), then retains the new one."""
    from lepton_edge.fleet.homeassistant import legacy_ha_id

    store, bridge, client = bridge_env
    old = f"homeassistant/device/{legacy_ha_id('lab', 'cam_1')}/config"
    new = f"homeassistant/device/{ha_id('lab', 'cam_1')}/config"
    client.publish(old, json.dumps({"dev": {"ids": ["old"]}}), qos=1, retain=True).wait_for_publish(5)
    add_device(store, "lab", "cam_1")
    assert bridge.device_changed("lab", "cam_1") is True
    late = Recorder(mosquitto.port, client_id="ha-upgrade", topic="homeassistant/#")
    try:
        assert late.wait_for(lambda r: _configs(r, new), timeout=10)
        assert _configs(late, new)[0][0]["dev"]["ids"]  # the new config, retained
        # the old config emptied: not seen at all, or (a subscription that came before the bridge's publish
        # reached the broker: a CI run's did) seen retained and then emptied
        assert late.wait_for(lambda r: not _configs(r, old) or _configs(r, old)[-1][0] == "", timeout=10), \
            _configs(late, old)
    finally:
        late.close()
    later = Recorder(mosquitto.port, client_id="ha-upgrade-2", topic="homeassistant/#")
    try:  # what the broker keeps now: the new config only (retained messages of one subscription come together)
        assert later.wait_for(lambda r: _configs(r, new), timeout=10)
        assert _configs(later, old) == []
    finally:
        later.close()


def test_a_device_cannot_name_itself_so_that_clearing_its_old_id_deletes_another_device(bridge_env, mosquitto):
    """lab/cam-1.v2's id is hashed (lepton_lab_cam-1_v2_<6 hex>); a device named lab/cam-1_v2_<those hex>
    has exactly that as its old, unhashed id. Its first publish emptied that retained config, deleting
    lab/cam-1.v2 from Home Assistant for good (its config unchanged, the bridge never sent it again), and
    `fleet forget` of it did the same. An old id shaped as a hashed one is never cleared now."""
    from lepton_edge.fleet.forget import retained_topics
    from lepton_edge.fleet.homeassistant import legacy_ha_id, legacy_id_to_clear

    store, bridge, _client = bridge_env
    victim = ("lab", "cam-1.v2")
    hostile = ("lab", "cam-1_v2_" + ha_id(*victim).rsplit("_", 1)[1])
    assert legacy_ha_id(*hostile) == ha_id(*victim)  # the collision itself
    assert legacy_id_to_clear(*hostile) is None and legacy_id_to_clear("lab", "cam_1") == "lepton_lab_cam_1"
    # an old id that carries its own hash (a name with '_' and a replaced character) is still cleared
    assert legacy_id_to_clear("lab", "cam_1.v2") == legacy_ha_id("lab", "cam_1.v2") != ha_id("lab", "cam_1.v2")
    assert legacy_id_to_clear("site_a", "cam-1.v2") == legacy_ha_id("site_a", "cam-1.v2")
    assert bridge.config_topic(*victim) not in retained_topics(*hostile)
    add_device(store, *victim)
    assert bridge.device_changed(*victim) is True
    add_device(store, *hostile)
    assert bridge.device_changed(*hostile) is True
    bridge.sync()
    late = Recorder(mosquitto.port, client_id="ha-collision", topic="homeassistant/#")
    try:
        assert late.wait_for(lambda r: _configs(r, bridge.config_topic(*hostile)), timeout=10)
        time.sleep(0.5)  # (retained messages of one subscription come together)
        kept = _configs(late, bridge.config_topic(*victim))
        assert kept and kept[0][0]["dev"]["ids"], kept  # the victim's config is still retained, not emptied
    finally:
        late.close()


def test_birth_messages_from_anyone_resend_the_configs_at_most_once_per_gap(bridge_env, mosquitto):
    """Anyone who may publish on the broker may publish Home Assistant's birth: each one woke the bridge to
    resend every config, and 91 births in 10 s had it republish 44,000 retained configs for 500 devices. A
    resend now comes at most once per birth_gap_s (30 s); the first birth is answered at once."""
    store, bridge, client = bridge_env
    topic = f"homeassistant/device/{ha_id('lab', 'cam-1.v2')}/config"
    rec = Recorder(mosquitto.port, client_id="ha-sub-births", topic="homeassistant/device/#")
    evil = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ha-births")
    try:
        assert rec.wait_for(lambda r: len(_configs(r, topic)) == 1, timeout=10)  # the bridge's first sync
        evil.connect("127.0.0.1", mosquitto.port)
        evil.loop_start()
        evil.publish("homeassistant/status", "online", qos=1).wait_for_publish(5)
        assert rec.wait_for(lambda r: len(_configs(r, topic)) == 2, timeout=10)  # answered at once
        for _ in range(15):
            evil.publish("homeassistant/status", "online", qos=1).wait_for_publish(5)
            time.sleep(0.2)
        time.sleep(3 * bridge.interval_s)
        assert len(_configs(rec, topic)) == 2
    finally:
        evil.loop_stop()
        rec.close()
