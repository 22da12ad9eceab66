"""The agent: runs the pipeline, sends one telemetry window every `window_s`, answers commands.

Why the threads are arranged this way: the pipeline never waits for the network (it runs in its
own thread and only adds to rolling statistics); every window is committed to the SQLite outbox
before the publisher sees it, so a broker that is down at start or for hours costs nothing but
outbox rows; commands run in a thread of their own, so a deploy's download and health check do
not stall paho's network loop (whose acknowledgements empty the outbox) nor the model, which
keeps serving the old bundle until the new one is swapped in.
"""
from __future__ import annotations

import json
import queue
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lepton_edge import __version__
from lepton_edge.agent import commands
from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.deploy import BundleStore, DeployError
from lepton_edge.capture import open_source
from lepton_edge.errors import BadInput, LeptonError
from lepton_edge.pipeline import Pipeline, capture_threads
from lepton_edge.runtime import Runtime
from lepton_edge.stats import summarize
from lepton_edge.telemetry.health import Health
from lepton_edge.telemetry.outbox import Outbox
from lepton_edge.telemetry.publisher import Publisher
from lepton_edge.telemetry.schema import (DeployCommand, Event, PingCommand, Reply, SetCommand, Status,
                                          Telemetry)
from lepton_edge.telemetry.topics import Topics


def _json(model) -> bytes:
    return model.model_dump_json(exclude_none=False).encode()


class Agent:
    def __init__(self, cfg: AgentConfig, log=print):
        self.cfg, self.log = cfg, log
        self.topics = Topics(cfg.fleet, cfg.device_id)
        self.boot_id = uuid.uuid4().hex[:12]
        self.seq = 0
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = BundleStore(cfg.state_dir, cfg.trusted_keys, cfg.max_download_bytes)
        bundle = self.store.current() or cfg.bundle
        if bundle is None:
            raise BadInput("no bundle: set `bundle` in the config (or --bundle)")
        self.runtime = self._load(Path(bundle), cfg.threads, check_signature=True)
        self.source = open_source(cfg.source, max_backoff=cfg.max_backoff_s, loop=cfg.loop,
                                  decode_threads=capture_threads(self.runtime))
        self.pipeline = Pipeline(self.source, self.runtime)
        self.pipeline.sample_every = cfg.sample_every
        self.window_s = cfg.window_s
        self.telemetry = True  # windows on; `set {"telemetry": false}` pauses them (a metered link)
        self.outbox = Outbox(cfg.state_dir / "outbox.sqlite", cfg.outbox_max, durable=cfg.outbox_fsync)
        self.health = Health()
        self.publisher = Publisher(
            cfg.broker, f"lepton-{cfg.fleet}-{cfg.device_id}", self.outbox,
            will=(self.topics.status, _json(Status(online=False, boot_id=self.boot_id, version=__version__))),
            username=cfg.username, password=cfg.password,
            ca_file=str(cfg.ca_file) if cfg.ca_file else None, cert_file=str(cfg.cert_file) if cfg.cert_file else None,
            key_file=str(cfg.key_file) if cfg.key_file else None, on_connect=self._on_connect,
            on_message=self._on_message, subscriptions=[self.topics.cmd("+")], max_backoff=cfg.max_backoff_s)
        self._commands: queue.Queue = queue.Queue(maxsize=100)
        self._stop = threading.Event()
        self._deploying = threading.Lock()
        self.pipeline_error: str | None = None
        self._prev_counts = (0, 0)  # source dropped / corrupt at the last window: windows report the difference

    # ---- loading a bundle ---------------------------------------------------------------------
    def _load(self, path: Path, threads: int | None, check_signature: bool) -> Runtime:
        if check_signature and self.cfg.trusted_keys:
            try:
                self.store.verify(path)
            except DeployError as e:
                raise BadInput(str(e)) from None
        return Runtime.load(path, threads=threads, leave_cores=1)

    def _bundle_info(self) -> dict[str, Any]:
        d = self.runtime.describe()
        return {k: d.get(k) for k in ("name", "version", "format", "precision", "target", "sha256", "backend",
                                      "threads")} | {"path": str(self.runtime.path)}

    # ---- MQTT side ----------------------------------------------------------------------------
    def _on_connect(self, pub: Publisher) -> None:
        pub.publish_now(self.topics.status, _json(Status(online=True, boot_id=self.boot_id, version=__version__)),
                        retain=True)
        self._publish_meta()

    def _publish_meta(self) -> None:
        import platform

        meta = {"v": 1, "ts": round(time.time(), 3), "boot_id": self.boot_id, "software": __version__,
                "bundle": self._bundle_info(), "source": self.source.spec, "window_s": self.window_s,
                "telemetry": self.telemetry,
                "hardware": {"machine": platform.machine(), "system": platform.system(),
                             "python": platform.python_version(), "node": platform.node()}}
        self.publisher.publish_now(self.topics.meta, json.dumps(meta).encode(), retain=True)

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = Topics.parse(topic)
        if not parsed or not parsed[2].startswith("cmd/"):
            return
        try:
            self._commands.put_nowait((parsed[2][4:], payload))
        except queue.Full:
            self.event("command_error", "command queue full; command dropped", "warning")

    def send(self, topic: str, payload: bytes) -> None:
        """Every message the agent originates goes through the outbox (QoS 1, nothing lost)."""
        self.outbox.put(topic, payload)
        self.publisher.wake()

    def event(self, kind: str, message: str, level: str = "info", **data) -> None:
        self.log(f"{kind}: {message}")
        self.send(self.topics.events, _json(Event(boot_id=self.boot_id, kind=kind, level=level, message=message,
                                                  data=data)))

    def reply(self, verb: str, cid: str | None, ok: bool, error: str | None = None, **data) -> None:
        self.send(self.topics.reply(verb), _json(Reply(id=cid, ok=ok, error=error, data=data)))

    # ---- telemetry windows --------------------------------------------------------------------
    def window(self) -> Telemetry:
        """Take this window's figures, commit them to the outbox, wake the publisher."""
        snap = self.pipeline.stats.window()
        lat = {k: {m: v[m] for m in ("p50", "p95", "p99", "max")} for k, v in snap["latency_ms"].items() if v}
        src = self.source.status()
        prev = self._prev_counts
        corrupt = src["corrupt"] + self.pipeline.bad_frames
        t = Telemetry(boot_id=self.boot_id, seq=self.seq, window_s=self.window_s, frames=snap["window_frames"],
                      fps=snap["fps"], dropped=src["dropped"] - prev[0], corrupt=corrupt - prev[1], latency_ms=lat,
                      bundle={"name": self.runtime.name, "sha256": self._bundle_info().get("sha256")},
                      outbox_dropped=self.outbox.take_dropped(), source=src, **self.health.sample())
        self._prev_counts = (src["dropped"], corrupt)
        self.send(self.topics.telemetry, _json(t))
        self.seq += 1
        return t

    def set_telemetry(self, on: bool) -> None:
        """Pause or resume telemetry windows (status, events and replies are never paused)."""
        if on and not self.telemetry:
            self.pipeline.stats.reset()  # the next window covers frames from now on
        self.telemetry = on

    # ---- commands -----------------------------------------------------------------------------
    def _command_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._commands.get(timeout=5.0)  # stop() wakes it with None: no polling
            except queue.Empty:
                continue
            if item is None:
                continue
            verb, payload = item
            try:
                cmd = commands.parse(verb, payload)
            except commands.CommandError as e:
                self.reply(verb if verb.isidentifier() else "unknown", e.command_id, False, str(e))
                self.event("command_error", f"{verb}: {e}", "warning")
                continue
            try:
                self.handle(verb, cmd)
            except Exception as e:  # a failing command is a reply and an event, never the agent's end
                self.reply(verb, cmd.id, False, f"{type(e).__name__}: {e}")
                self.event("error", f"{verb} failed: {e}", "error")

    def handle(self, verb: str, cmd) -> None:
        if isinstance(cmd, PingCommand):
            self.reply("ping", cmd.id, True, boot_id=self.boot_id, seq=self.seq, uptime_s=round(
                time.monotonic() - self._started, 3), outbox=len(self.outbox), bundle=self._bundle_info())
        elif isinstance(cmd, SetCommand):
            changed = {}
            if cmd.window_s is not None:
                self.window_s = changed["window_s"] = cmd.window_s
            if cmd.telemetry is not None:
                self.set_telemetry(cmd.telemetry)
                changed["telemetry"] = cmd.telemetry
            if cmd.sample_every is not None:
                self.pipeline.sample_every = changed["sample_every"] = cmd.sample_every
            if cmd.threads is not None:
                rt = Runtime.load(self.runtime.path, threads=cmd.threads, leave_cores=1)
                self.pipeline.swap(rt)
                self.runtime = rt
                changed["threads"] = cmd.threads
            self.reply("set", cmd.id, True, **changed)
            self.event("set", f"settings changed: {changed}", **changed)
            self._publish_meta()
        elif isinstance(cmd, DeployCommand):
            self.deploy(cmd)

    def deploy(self, cmd: DeployCommand) -> None:
        """Fetch and verify while the old model serves; swap; health-check; keep or roll back."""
        if not self._deploying.acquire(blocking=False):
            self.reply("deploy", cmd.id, False, "another deploy is in progress")
            return
        try:
            self._deploy(cmd)
        finally:
            self._deploying.release()

    def _deploy(self, cmd: DeployCommand) -> None:
        where = cmd.url or cmd.path
        try:
            path = self.store.fetch(cmd)
            signed = self.store.verify(path)
        except DeployError as e:
            self.reply("deploy", cmd.id, False, str(e))
            self.event("deploy_failed", f"{where}: {e}", "error", source=where)
            return
        try:
            new = Runtime.load(path, threads=self.cfg.threads, leave_cores=1)
        except LeptonError as e:
            self.store.discard(path)
            self.reply("deploy", cmd.id, False, f"rolled back: the new bundle does not load ({e})")
            self.event("rollback", f"{where}: does not load: {e}", "warning", source=where)
            return
        old = self.pipeline.swap(new)
        self.runtime = new
        ok, why, figures = self._health_check(new, cmd.health_frames or self.cfg.health_frames)
        if not ok:
            self.pipeline.swap(old)
            self.runtime = old
            self.store.discard(path)
            self.reply("deploy", cmd.id, False, f"rolled back: {why}", **figures)
            self.event("rollback", f"{new.name}: {why}; back to {old.name}", "warning", **figures)
            return
        self.store.set_current(path)
        self.reply("deploy", cmd.id, True, bundle=self._bundle_info(), **signed, **figures)
        self.event("deploy", f"now running {new.name} from {where}", bundle=self._bundle_info(), **figures)
        self._publish_meta()

    def _health_check(self, rt: Runtime, frames: int) -> tuple[bool, str, dict]:
        """N frames through the new model: inference p50 must be within the target's latency budget."""
        deadline = time.monotonic() + self.cfg.health_timeout_s
        probe = self.pipeline.probe
        while len(probe) < frames and time.monotonic() < deadline and not self._stop.is_set():
            if self.pipeline_error:
                return False, f"the pipeline failed: {self.pipeline_error}", {}
            time.sleep(0.02)
        seen = list(probe)
        if len(seen) < frames:
            return False, f"only {len(seen)} of {frames} health-check frames in {self.cfg.health_timeout_s:g} s", {}
        s = summarize(seen)
        budget = rt.bundle.manifest.target.get("latency_budget_ms") if rt.bundle else None
        figures = {"health_frames": len(seen), "inference_p50_ms": round(s["p50"], 4),
                   "inference_p95_ms": round(s["p95"], 4), "latency_budget_ms": budget}
        if budget is not None and s["p50"] > budget:
            return False, f"inference p50 {s['p50']:.3f} ms exceeds the {budget:g} ms latency budget", figures
        return True, "", figures

    # ---- the service --------------------------------------------------------------------------
    def _pipeline_loop(self) -> None:
        try:
            for _ in self.pipeline:
                if self._stop.is_set():
                    break
            if not self._stop.is_set():
                self.event("source_ended", f"source {self.source.spec} ended", "warning")
        except Exception as e:
            self.pipeline_error = f"{type(e).__name__}: {e}"
            self.event("error", f"pipeline stopped: {self.pipeline_error}", "error")

    def stop(self, *_args) -> None:
        self._stop.set()
        try:
            self._commands.put_nowait(None)  # wake the command thread
        except queue.Full:
            pass

    def run(self, install_signals: bool = True) -> int:
        if install_signals:
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        self._started = time.monotonic()
        self.publisher.start()
        threads = [threading.Thread(target=self._pipeline_loop, name="agent:pipeline", daemon=True),
                   threading.Thread(target=self._command_loop, name="agent:commands", daemon=True)]
        for t in threads:
            t.start()
        self.event("started", f"{self.runtime.name} on {self.source.kind} {self.source.spec}",
                   bundle=self._bundle_info(), boot_id=self.boot_id)
        next_window = time.monotonic() + self.window_s
        while not self._stop.is_set():
            if self._stop.wait(max(0.0, next_window - time.monotonic())):
                break
            if self.telemetry:
                self.window()
            next_window += self.window_s
            if next_window < time.monotonic():  # fell behind (suspend, a slow disk): do not burst
                next_window = time.monotonic() + self.window_s
        return self._shutdown()

    def _shutdown(self) -> int:
        """Last window, 'stopped' event, offline status, flush what the broker will take, exit 0."""
        if self.telemetry:
            self.window()
        self.event("stopped", "graceful stop")
        self.publisher.flush(timeout=5.0)
        self.publisher.publish_now(self.topics.status, _json(Status(online=False, boot_id=self.boot_id,
                                                                    version=__version__)), retain=True, timeout=2.0)
        self.publisher.stop()
        self.pipeline.close()
        left = len(self.outbox)
        self.outbox.close()
        self.log(f"stopped; {left} message(s) left in the outbox for the next start")
        return 0
