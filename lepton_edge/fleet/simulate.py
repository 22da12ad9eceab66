"""`lepton-edge simulate`: a fleet of simulated devices on a real broker, for demos and load tests.

Why it is built this way:
- Each device is a real MQTT client with its own connection and Last Will, so the monitor sees
  exactly what a fleet of agents would send: retained status and meta, QoS 1 telemetry windows
  (schema-valid, `lepton_edge.telemetry.schema`), events, and replies to `cmd/ping|set|deploy`.
- A thousand paho clients in one process cannot each own a network thread (loop_start): a few
  loop threads each drive a slice of the clients through one selector (epoll), calling paho's
  loop_read / loop_write / loop_misc themselves. Each client is touched by its own loop thread
  only, so paho needs no lock and publish() writes straight to the socket.
- Everything random comes from one seed, so a run can be repeated; the run is bounded in time
  (`seconds`) and size (`devices` <= MAX_DEVICES) before anything connects.
- The behaviours an operator must be able to see are built in at fixed shares of the fleet:
  dropouts (windows skipped: seq gaps), restarts (new boot_id), slow devices (inference p95 above
  the latency budget), hot devices (temperature and throttling), rollbacks (deploy + rollback
  events) and devices that die (socket dropped without DISCONNECT, so the broker fires the Will).
"""
from __future__ import annotations

import heapq
import json
import math
import random
import resource
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from lepton_edge import __version__
from lepton_edge.errors import BadInput
from lepton_edge.telemetry.broker import make_client, parse_broker, redacted
from lepton_edge.telemetry.schema import COMMANDS, BundleInfo, Event, Hardware, Meta, Reply, Status, Telemetry
from lepton_edge.telemetry.topics import Topics, safe_segment

MAX_DEVICES = 20000
MAX_SECONDS = 7 * 86400
CLIENTS_PER_LOOP = 250
LATENCY_BUDGET_MS = 50.0  # the simulated bundles' target budget (rpi4-like)

# Share of the fleet with each behaviour (drawn per device from the seed).
SHARES = {"lossy": 0.10, "slow": 0.05, "hot": 0.03, "restart": 0.05, "rollback": 0.03, "dies": 0.02}


def _json(model) -> bytes:
    return model.model_dump_json().encode()


@dataclass
class SimDevice:
    """One device's drifting state; every number moves by a bounded random walk."""

    fleet: str
    name: str
    rng: random.Random
    window_s: float
    traits: set[str] = field(default_factory=set)
    boot_id: str = ""
    seq: int = 0
    fps: float = 15.0
    infer_ms: float = 10.0
    temp: float = 50.0
    cpu: float = 40.0
    rss: float = 80e6
    restart_at: float | None = None
    rollback_at: float | None = None
    die_at: float | None = None
    client: object = None
    sock: socket.socket | None = None
    connected: bool = False
    counted: bool = False  # has connected once (the simulator's connect time counts first connections)
    sub_mid: int = -1  # the command subscription's SUBSCRIBE, whose SUBACK counts the device as connected
    dead: bool = False

    def __post_init__(self):
        r = self.rng
        self.topics = Topics(self.fleet, self.name)
        self.boot_id = f"{r.getrandbits(48):012x}"
        self.base_fps = r.uniform(8, 30)
        self.fps = self.base_fps
        self.base_ms = r.uniform(30, 45) if "slow" in self.traits else r.uniform(3, 20)
        self.infer_ms = self.base_ms
        self.base_temp = r.uniform(78, 84) if "hot" in self.traits else r.uniform(40, 62)
        self.temp = self.base_temp
        self.sha = f"{r.getrandbits(256):064x}"

    @staticmethod
    def _walk(r: random.Random, x: float, base: float, spread: float) -> float:
        """Mean-reverting random walk: drifts, never runs away."""
        return x + 0.2 * (base - x) + r.gauss(0, spread)

    def telemetry(self) -> Telemetry:
        r = self.rng
        self.fps = max(0.5, self._walk(r, self.fps, self.base_fps, 0.6))
        self.infer_ms = max(0.5, self._walk(r, self.infer_ms, self.base_ms, 0.5))
        self.temp = self._walk(r, self.temp, self.base_temp, 0.4)
        self.cpu = min(400.0, max(1.0, self._walk(r, self.cpu, 40.0, 3.0)))
        self.rss = max(20e6, self._walk(r, self.rss, 80e6, 1e6))
        p50 = self.infer_ms
        tail = 1.9 if "slow" in self.traits else 1.3  # slow devices: p95 over the budget
        lat = {"capture": {"p50": 0.4, "p95": 0.9, "p99": 1.3, "max": 2.0},
               "preprocess": {"p50": 0.2, "p95": 0.3, "p99": 0.4, "max": 0.6},
               "inference": {"p50": round(p50, 3), "p95": round(p50 * tail, 3), "p99": round(p50 * tail * 1.2, 3),
                             "max": round(p50 * tail * 1.5, 3)},
               "postprocess": {"p50": 0.05, "p95": 0.08, "p99": 0.1, "max": 0.2}}
        return Telemetry(boot_id=self.boot_id, seq=self.seq, window_s=self.window_s,
                         frames=int(self.fps * self.window_s), fps=round(self.fps, 3),
                         dropped=r.randrange(3) if r.random() < 0.1 else 0, corrupt=0, latency_ms=lat,
                         cpu_percent=round(self.cpu, 1), system_cpu_percent=round(self.cpu / 4, 1),
                         rss_bytes=int(self.rss), temperature_c=round(self.temp, 1),
                         throttled="0x50005" if "hot" in self.traits and self.temp > 80 else None,
                         bundle={"name": "fashion-cnn", "sha256": self.sha},
                         source={"kind": "simulated", "spec": "sim"})

    def meta(self) -> bytes:
        return _json(Meta(
            boot_id=self.boot_id, software=__version__,
            bundle=BundleInfo(name="fashion-cnn", version="1", format="tflite", precision="int8", target="rpi4",
                              sha256=self.sha, backend="litert", threads=4, path="sim",
                              latency_budget_ms=LATENCY_BUDGET_MS),
            source="sim", window_s=self.window_s, telemetry=True,
            hardware=Hardware(machine="aarch64", system="Linux", python="3.11", node=self.name, simulated=True)))


class _Loop(threading.Thread):
    """Drives a slice of the devices: connects them, sends their windows, answers their commands."""

    def __init__(self, sim: Simulator, devices: list[SimDevice]):
        super().__init__(name=f"simulate:{devices[0].name}", daemon=True)
        self.sim, self.devices = sim, devices
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, str, SimDevice]] = []
        self._n = 0
        self.inbox: list[tuple[str, str]] = []  # (action, device) from other threads (kill)
        self.lock = threading.Lock()

    def at(self, t: float, what: str, d: SimDevice) -> None:
        self._n += 1
        heapq.heappush(self.timers, (t, self._n, what, d))

    # ---- MQTT -----------------------------------------------------------------------------------
    def _connect(self, d: SimDevice) -> None:
        sim = self.sim
        c = d.client
        if c is None:
            c = make_client(sim.addr, f"lepton-sim-{d.fleet}-{d.name}", clean_session=True)
            c.on_connect = lambda cl, u, f, rc, p=None, d=d: self._on_connect(d, rc)
            c.on_message = lambda cl, u, m, d=d: self._on_message(d, m)
            c.on_subscribe = lambda cl, u, mid, rcs, p=None, d=d: self._on_subscribe(d, mid)
            c.max_inflight_messages_set(100)
            d.client = c
        c.will_set(d.topics.status, _json(Status(online=False, boot_id=d.boot_id, version=__version__)), qos=1,
                   retain=True)
        try:
            c.connect(sim.addr.host, sim.addr.port, keepalive=30)
        except OSError:
            self.at(time.monotonic() + 1 + d.rng.random(), "connect", d)
            return
        d.sock = c.socket()
        self.sel.register(d.sock, selectors.EVENT_READ, d)
        self._want_write(d)

    def _on_connect(self, d: SimDevice, rc) -> None:
        if rc.is_failure:
            return
        d.connected = True
        c = d.client
        d.sub_mid = c.subscribe(d.topics.cmd("+"), qos=1)[1]
        c.publish(d.topics.status, _json(Status(online=True, boot_id=d.boot_id, version=__version__)), qos=1,
                  retain=True)
        c.publish(d.topics.meta, d.meta(), qos=1, retain=True)
        self._event(d, "started", "simulated device started")

    def _on_subscribe(self, d: SimDevice, mid: int) -> None:
        """A device counts as connected (`wait_connected`) once the broker took its command subscription:
        counted on CONNACK, a command sent at once to the last device to connect was lost (3 in 120 on a
        loaded host), its SUBSCRIBE not yet written."""
        if mid != d.sub_mid:
            return
        first, d.counted = not d.counted, True
        if first:
            self.sim._connected()

    def _on_message(self, d: SimDevice, msg) -> None:
        if msg.retain or not msg.topic.startswith(d.topics.base + "/cmd/") or msg.topic.endswith("/reply"):
            return  # retained commands are ignored, like the agent
        verb = msg.topic.rsplit("/", 1)[-1]
        model = COMMANDS.get(verb)
        cid = None
        try:
            body = json.loads(msg.payload or b"{}")
            cid = body.get("id") if isinstance(body, dict) else None
            if model is None:
                raise ValueError(f"unknown command {verb!r}")
            cmd = model.model_validate(body)
        except Exception as e:  # a bad command is a reply, never the simulator's end
            self._publish(d, d.topics.reply(verb if verb.isidentifier() else "unknown"),
                          _json(Reply(id=cid if isinstance(cid, str) else None, ok=False, error=str(e)[:300])))
            return
        data: dict = {"boot_id": d.boot_id, "seq": d.seq, "simulated": True}
        if verb == "set" and cmd.window_s:
            d.window_s = cmd.window_s
            data["window_s"] = cmd.window_s
        if verb == "deploy":
            self._event(d, "deploy", f"now running fashion-cnn from {cmd.url or cmd.path}", source=cmd.url or cmd.path)
        self.sim.stats["commands"] += 1
        self._publish(d, d.topics.reply(verb), _json(Reply(id=cmd.id, ok=True, data=data)))

    def _publish(self, d: SimDevice, topic: str, payload: bytes, retain: bool = False) -> None:
        if d.connected and not d.dead:
            d.client.publish(topic, payload, qos=1, retain=retain)
            self._want_write(d)

    def _event(self, d: SimDevice, kind: str, message: str, level: str = "info", **data) -> None:
        self.sim.stats["events"] += 1
        self._publish(d, d.topics.events, _json(Event(boot_id=d.boot_id, kind=kind, level=level, message=message,
                                                      data=data)))

    def _want_write(self, d: SimDevice) -> None:
        if d.sock is None:
            return
        ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if d.client.want_write() else 0)
        try:
            if self.sel.get_key(d.sock).events != ev:
                self.sel.modify(d.sock, ev, d)
        except (KeyError, ValueError):
            pass

    def _drop(self, d: SimDevice) -> None:
        if d.sock is not None:
            try:
                self.sel.unregister(d.sock)
            except (KeyError, ValueError):
                pass
        d.sock = None
        d.connected = False

    # ---- behaviours -----------------------------------------------------------------------------
    def _window(self, d: SimDevice, now: float) -> None:
        if d.dead:
            return
        if d.connected:
            if "lossy" in d.traits and d.rng.random() < 0.05:
                self.sim.stats["skipped"] += 1  # a dropout: the seq moves on, the window never leaves
            else:
                self._publish(d, d.topics.telemetry, _json(d.telemetry()))
                self.sim.stats["windows"] += 1
            d.seq += 1
        self.at(now + d.window_s, "window", d)

    def _restart(self, d: SimDevice) -> None:
        """A graceful restart: stopped event, offline status, new boot_id, seq from 0."""
        if d.dead or not d.connected:
            return
        self._event(d, "stopped", "graceful stop")
        self._publish(d, d.topics.status, _json(Status(online=False, boot_id=d.boot_id, version=__version__)),
                      retain=True)
        d.client.disconnect()
        self._drop(d)
        d.boot_id, d.seq = f"{d.rng.getrandbits(48):012x}", 0
        self.sim.stats["restarts"] += 1
        self._connect(d)

    def _rollback(self, d: SimDevice) -> None:
        if d.dead:
            return
        self._event(d, "deploy", "now running fashion-cnn-v2 from https://example.invalid/v2.tar.gz")
        self._event(d, "rollback", "fashion-cnn-v2: inference p50 71.2 ms exceeds the 50 ms latency budget; "
                    "back to fashion-cnn", "warning", inference_p50_ms=71.2, latency_budget_ms=LATENCY_BUDGET_MS)
        self.sim.stats["rollbacks"] += 1

    def _die(self, d: SimDevice) -> None:
        """Power cut: the socket goes away without DISCONNECT, so the broker publishes the Last Will."""
        if d.dead:
            return
        sock = d.sock
        self._drop(d)
        d.dead = True
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.sim.stats["died"] += 1

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        sim = self.sim
        self._start_all(time.monotonic())
        next_misc = time.monotonic() + 1.0
        while not sim._stop.is_set():
            now = time.monotonic()
            self._take_inbox()
            self._fire_timers(now)
            if now >= next_misc:
                next_misc = now + 1.0
                self._keepalive()
            wait = min((self.timers[0][0] if self.timers else now + 0.2), next_misc, now + 0.2) - time.monotonic()
            self._service_sockets(max(0.0, wait))
        self._shutdown()

    def _start_all(self, start: float) -> None:
        """Connect every device; schedule its first window (at a random phase) and its scripted faults."""
        for d in self.devices:
            self._connect(d)
            phase = d.rng.uniform(0, d.window_s)
            self.at(start + phase, "window", d)
            for what, t in (("restart", d.restart_at), ("rollback", d.rollback_at), ("die", d.die_at)):
                if t is not None:
                    self.at(start + t, what, d)

    def _take_inbox(self) -> None:
        """Actions queued from other threads (commands), run on the loop's thread."""
        with self.lock:
            inbox, self.inbox = self.inbox, []
        for action, name in inbox:
            for d in self.devices:
                if d.name == name:
                    getattr(self, f"_{action}")(d)

    def _fire_timers(self, now: float) -> None:
        """Every timer due by `now`: windows, reconnects, scripted faults."""
        while self.timers and self.timers[0][0] <= now:
            _, _, what, d = heapq.heappop(self.timers)
            if what == "window":
                self._window(d, now)
            elif what == "connect":
                if not d.dead and d.sock is None:
                    self._connect(d)
            else:
                getattr(self, f"_{what}")(d)

    def _keepalive(self) -> None:
        """Once a second: paho's keepalive for every connected device; a failed one is a lost connection."""
        for d in self.devices:
            if d.sock is not None and d.client.loop_misc() != 0:
                self._lost(d)
            else:
                self._want_write(d)

    def _service_sockets(self, timeout: float) -> None:
        """Read and write whichever sockets are ready within `timeout`."""
        for key, ev in self.sel.select(timeout=timeout):
            d = key.data
            rc = 0
            if ev & selectors.EVENT_READ:
                rc = d.client.loop_read()
            if not rc and ev & selectors.EVENT_WRITE and d.sock is not None:
                rc = d.client.loop_write()
            if rc:
                self._lost(d)
            else:
                self._want_write(d)

    def _lost(self, d: SimDevice) -> None:
        """The broker went away: reconnect later, like the agent's backoff."""
        self._drop(d)
        if not d.dead:
            self.sim.stats["reconnects"] += 1
            self.at(time.monotonic() + 1 + d.rng.random(), "connect", d)

    def _shutdown(self) -> None:
        """End of the run: the living devices stop gracefully (stopped event, offline status)."""
        for d in self.devices:
            if d.connected and not d.dead:
                self._event(d, "stopped", "graceful stop")
                self._publish(d, d.topics.status, _json(Status(online=False, boot_id=d.boot_id,
                                                                version=__version__)), retain=True)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(d.sock is not None and d.client.want_write() for d in self.devices):
            for key, ev in self.sel.select(timeout=0.1):
                d = key.data
                if (d.client.loop_write() if ev & selectors.EVENT_WRITE else d.client.loop_read()):
                    self._drop(d)
                else:
                    self._want_write(d)
        for d in self.devices:
            if d.sock is not None:
                d.client.disconnect()
                self._drop(d)
        self.sel.close()


class Simulator:
    """N simulated devices on `broker`; start(), then wait() or stop(); summary() at any time."""

    def __init__(self, broker: str, *, devices: int = 100, window_s: float = 1.0, seconds: float = 60.0,
                 seed: int = 1, fleet: str = "sim", prefix: str = "sim", shares: dict[str, float] | None = None,
                 clients_per_loop: int = CLIENTS_PER_LOOP):
        if not 1 <= devices <= MAX_DEVICES:
            raise BadInput(f"--devices must be between 1 and {MAX_DEVICES}")
        if not 0.1 <= window_s <= 3600:
            raise BadInput("--window must be between 0.1 and 3600 seconds")
        if not 0 < seconds <= MAX_SECONDS:
            raise BadInput(f"--seconds must be above 0 and at most {MAX_SECONDS}")
        safe_segment(fleet, "fleet")
        safe_segment(prefix, "device prefix")
        self.addr = parse_broker(broker)
        self.broker, self.seconds = broker, seconds
        self._raise_fd_limit(devices)
        master = random.Random(seed)
        shares = SHARES if shares is None else shares
        self.devices: list[SimDevice] = []
        width = max(4, len(str(devices)))
        for i in range(devices):
            r = random.Random(master.getrandbits(64))
            traits = {t for t, p in shares.items() if r.random() < p}
            d = SimDevice(fleet, f"{prefix}-{i:0{width}d}", r, window_s, traits)
            span = max(seconds, 1.0)
            if "restart" in traits:
                d.restart_at = r.uniform(0.3, 0.8) * span
            if "rollback" in traits:
                d.rollback_at = r.uniform(0.2, 0.9) * span
            if "dies" in traits:
                d.die_at = r.uniform(0.4, 0.9) * span
            self.devices.append(d)
        self.stats = {"windows": 0, "skipped": 0, "events": 0, "restarts": 0, "rollbacks": 0, "died": 0,
                      "reconnects": 0, "commands": 0}
        self._stop = threading.Event()
        self._n_connected = 0
        self._all_connected = threading.Event()
        self._count_lock = threading.Lock()
        self.loops = [_Loop(self, self.devices[i:i + clients_per_loop])
                      for i in range(0, devices, clients_per_loop)]
        self.started = self.connect_s = None

    @staticmethod
    def _raise_fd_limit(devices: int) -> None:
        """One socket per device: the soft open-files limit must allow them (checked before connecting)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = devices + 64
        if soft < need:
            if hard != resource.RLIM_INFINITY and hard < need:
                raise BadInput(f"{devices} devices need {need} open files; this process may open {hard} "
                               "(raise `ulimit -n`)")
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

    def _connected(self) -> None:
        with self._count_lock:
            self._n_connected += 1
            if self._n_connected == len(self.devices):
                self.connect_s = time.monotonic() - self.started
                self._all_connected.set()

    def start(self) -> Simulator:
        try:  # one probe first: an unreachable broker is one line, not N retrying clients
            socket.create_connection((self.addr.host, self.addr.port), timeout=5).close()
        except OSError as e:
            raise BadInput(f"cannot reach the broker {redacted(self.broker)}: {e}") from None
        self.started = time.monotonic()
        for loop in self.loops:
            loop.start()
        return self

    def wait_connected(self, timeout: float = 60.0) -> bool:
        return self._all_connected.wait(timeout)

    def kill(self, device: str) -> None:
        """Make one device die now (no clean offline: the broker's Last Will says it)."""
        for loop in self.loops:
            if any(d.name == device for d in loop.devices):
                with loop.lock:
                    loop.inbox.append(("die", device))
                return
        raise BadInput(f"no simulated device {device!r}")

    def wait(self) -> None:
        """Until `seconds` have passed (or stop()), then a graceful end for the living devices."""
        end = self.started + self.seconds
        while not self._stop.is_set() and time.monotonic() < end:
            self._stop.wait(min(0.5, max(0.0, end - time.monotonic())))
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for loop in self.loops:
            loop.join(timeout=15)

    def summary(self) -> dict:
        elapsed = time.monotonic() - self.started if self.started else 0.0
        traits: dict[str, int] = {}
        for d in self.devices:
            for t in d.traits:
                traits[t] = traits.get(t, 0) + 1
        return {"broker": self.broker, "devices": len(self.devices), "connected": self._n_connected,
                "connect_s": None if self.connect_s is None else round(self.connect_s, 3),
                "elapsed_s": round(elapsed, 1),
                "windows_per_s": round(self.stats["windows"] / elapsed, 1) if elapsed else 0.0,
                **self.stats, "traits": dict(sorted(traits.items())),
                "loops": len(self.loops), "window_s": self.devices[0].window_s,
                "expected_windows": int(math.floor(elapsed / self.devices[0].window_s)) * len(self.devices)}


def simulate(broker: str, **kw) -> dict:
    sim = Simulator(broker, **kw).start()
    try:
        sim.wait()
    except KeyboardInterrupt:
        sim.stop()
    return sim.summary()
