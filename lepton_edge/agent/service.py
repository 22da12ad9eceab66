"""The agent: runs the pipeline, sends one telemetry window every `window_s`, answers commands.

Why the threads are arranged this way: the pipeline never waits for the network (it runs in its
own thread and only adds to rolling statistics); every window is committed to the SQLite outbox
before the publisher sees it, so a broker that is down at start or for hours costs nothing but
outbox rows; commands run in a thread of their own, so a deploy's download and health check do
not stall paho's network loop (whose acknowledgements empty the outbox) nor the model, which
keeps serving the old bundle until the new one is swapped in.

Every thread survives any exception from the work it runs (it logs, sends an event, goes on): the
command thread (one bad payload must not silence every later command), the pipeline thread (an
inference error restarts the pipeline with backoff on the runtime then current), the deploy
worker, the main window loop and the publisher's threads. The agent runs unattended on devices
nobody watches; a thread that ends quietly is a device that is dead while its telemetry looks fine.
Commands are checked for size in paho's callback, before they are queued, and the queue is
bounded in bytes as well as in count, so a flood of large payloads costs no memory; retained
commands are ignored (they would run again at every start). Deploys run in a worker thread, so
pings are answered during a long download and a second deploy is told one is in progress.

Under systemd (Type=notify, WatchdogSec=) the main loop also speaks the notify protocol: READY=1
once the first frame went through the model (or the source ended before one did), so `systemctl
start` returns when inference works, not when a process exists; then WATCHDOG=1 every half
watchdog period but only while frames advance (taken from the source or out of the model; a
`sample_every` that skips frames is not a stall) or the source has legitimately ended. A hung
camera, a stuck inference or a dead main loop stops the pings, and systemd restarts the agent.
"""
from __future__ import annotations

import logging
import queue
import signal
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lepton_edge import __version__
from lepton_edge.agent import commands
from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.deploy import BundleStore, DeployError
from lepton_edge.agent.systemd import Notifier
from lepton_edge.capture import SourceState, StatusUpdate, open_source
from lepton_edge.errors import BadInput, LeptonError, disk_full
from lepton_edge.pipeline import Pipeline, capture_threads
from lepton_edge.runtime import Runtime
from lepton_edge.stats import summarize
from lepton_edge.telemetry.health import Health
from lepton_edge.telemetry.outbox import Outbox, OutboxInUse
from lepton_edge.telemetry.publisher import Publisher
from lepton_edge.telemetry.schema import (
    MAX_COMMAND_BYTES,
    MAX_EVENT_MESSAGE,
    BundleInfo,
    DeployCommand,
    Event,
    Hardware,
    Meta,
    PingCommand,
    Reply,
    SetCommand,
    Status,
    Telemetry,
)
from lepton_edge.telemetry.topics import Topics

_log = logging.getLogger(__name__)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}

MAX_QUEUED_COMMAND_BYTES = 1 << 20  # commands waiting for the command thread, all together
STOP_POLL_S = 0.2  # how soon run() acts on a signal's request_stop (a flag: see request_stop)
RATE_LIMIT_S = 5.0  # at most one event (or log line) of a kind this often when something repeats
REJECT_BURST, REJECT_PER_S = 20, 10.0  # error replies to oversized or malformed commands: a token bucket


def _json(model) -> bytes:
    return model.model_dump_json(exclude_none=False).encode()


class Agent:
    def __init__(self, cfg: AgentConfig, log=None):
        self.cfg = cfg
        self._line = log  # a caller's line sink (the quickstart's console); else the `logging` setup decides

        self.topics = Topics(cfg.fleet, cfg.device_id)
        self.boot_id = uuid.uuid4().hex[:12]
        self.seq = 0
        self.publisher: Publisher | None = None  # events before it exists wait in the outbox
        self._rate: dict[str, tuple[float, int]] = {}  # kind -> (last sent, suppressed since)
        self._rate_lock = threading.Lock()
        self._reject_tokens, self._reject_at = float(REJECT_BURST), time.monotonic()
        self._send_failures = 0
        self._writable(cfg.state_dir)
        try:
            self.outbox = Outbox(cfg.state_dir / "outbox.sqlite", cfg.outbox_max, durable=cfg.outbox_fsync,
                                 exclusive=True)
        except OutboxInUse as e:
            raise BadInput(f"state_dir {cfg.state_dir}: {e}") from None
        except (sqlite3.Error, OSError) as e:
            raise BadInput(f"state_dir {cfg.state_dir}: {type(e).__name__}: {e}") from None
        try:
            try:
                self.store = BundleStore.from_config(cfg)
            except OSError as e:
                raise BadInput(f"state_dir {cfg.state_dir}: {type(e).__name__}: {e}") from None
            self.runtime = self._start_bundle()
            self.source = open_source(cfg.source, max_backoff=cfg.max_backoff_s, loop=cfg.loop,
                                      decode_threads=capture_threads(self.runtime), policy=cfg.source_policy)
            self.source.add_listener(self._on_source_status)
            self.pipeline = Pipeline(self.source, self.runtime)
            self.pipeline.sample_every = cfg.sample_every
            self.window_s = cfg.window_s
            self.telemetry = True  # windows on; `set {"telemetry": false}` pauses them (a metered link)
            self.health = Health()
            self.publisher = Publisher(
                cfg.broker, f"lepton-{cfg.fleet}-{cfg.device_id}", self.outbox,
                will=(self.topics.status, _json(Status(online=False, boot_id=self.boot_id, version=__version__))),
                username=cfg.username, password=cfg.password,
                ca_file=str(cfg.ca_file) if cfg.ca_file else None,
                cert_file=str(cfg.cert_file) if cfg.cert_file else None,
                key_file=str(cfg.key_file) if cfg.key_file else None, on_connect=self._on_connect,
                on_message=self._on_message, subscriptions=[self.topics.cmd("+")], max_backoff=cfg.max_backoff_s,
                on_error=lambda m: self._rate_log("publisher", m),
                max_packet_bytes=cfg.mqtt_max_packet_bytes or None)
        except BaseException:  # (a refused bundle, a bad source): the outbox's file and lock are let go at once
            self.outbox.close()
            raise
        self._commands: queue.Queue = queue.Queue(maxsize=100)
        self._queued_bytes = 0  # payload bytes in self._commands (guarded by _qlock)
        self._qlock = threading.Lock()
        self._stop = threading.Event()
        self._stop_requested = False  # set by a signal (request_stop); run() turns it into stop()
        self._deploying = threading.Lock()  # one deploy (or threads change) at a time
        self._rt_lock = threading.Lock()  # self.runtime and self.pipeline change together
        self.pipeline_error: str | None = None  # the last pipeline failure, cleared when it restarts
        self.pipeline_failures = 0  # a health check compares this, never a stale error string
        self._prev_counts = (0, 0)  # source dropped / corrupt at the last window: windows report the difference
        self.notifier = Notifier()  # systemd's notify socket; does nothing when $NOTIFY_SOCKET is unset
        self.ready = False  # READY=1 sent (or, without systemd, would have been)
        self.source_ended = False  # a file source ran out: idle on purpose, not stalled
        self._flow_seen, self._flow_at = -1, time.monotonic()  # progress count at the last watchdog tick
        self._stall_told = False  # this stall has had its event

    # ---- loading a bundle ---------------------------------------------------------------------
    @staticmethod
    def _writable(state_dir: Path) -> None:
        """One line (exit 2) for a state directory the agent cannot write, not a traceback later. A full
        one (ENOSPC: no block or, what this probe meets, no inode left) is no refusal: the outbox drops
        and counts, or lives in memory, until there is space. Why: a disk whose inodes were all taken
        made the agent exit 2 at every start (a restart loop), where a disk out of blocks ran."""
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".write-test-"):
                pass
        except OSError as e:
            if disk_full(e) and Path(state_dir).is_dir():
                return
            raise BadInput(f"state_dir {state_dir} is not writable: {e.strerror or e}") from None

    def _open(self, path: Path, threads: int | None) -> Runtime:
        """Every runtime the agent runs, with this device's delegates and its limit on one run."""
        return Runtime.load(path, threads=threads, leave_cores=1, delegates=self.cfg.delegates,
                            max_run_s=self.cfg.max_run_s, max_run_bytes=self.cfg.max_run_bytes)

    def _load(self, path: Path, threads: int | None, check_signature: bool) -> Runtime:
        if check_signature and self.cfg.trusted_keys:
            try:
                self.store.verify(path)
            except DeployError as e:
                raise BadInput(str(e)) from None
        rt = self._open(path, threads)
        for w in rt.warnings:  # a manifest naming a delegate this device does not allow
            self.log(f"{path}: {w}", "warning")
        return rt

    @staticmethod
    def probe(rt: Runtime) -> None:
        """One blank frame of the model's input size through preprocess -> infer -> postprocess.
        Why: a manifest can disagree with its model (a 32x32 input declared for a 28x28 model) and
        every checksum still match; the engine then fails on the first frame. Found here, before
        the runtime is swapped in or started with, it is a refusal rather than a dead pipeline."""
        x = rt.blank_input()
        y = rt.infer(rt.preprocess(x))
        rt.postprocess(y, x.shape[:2])

    def _bundle_candidates(self):
        """Deployed bundles, newest good first, then the configured one."""
        candidates = getattr(self.store, "candidates", None)  # BundleStore's good-bundle history
        try:
            yield from (candidates() if candidates else [self.store.current()])
        except Exception as e:  # a broken state directory must not hide the configured bundle
            self.log(f"cannot list deployed bundles: {type(e).__name__}: {e}", "warning")
        yield self.cfg.bundle

    def _start_bundle(self) -> Runtime:
        """The first bundle that passes its checks (signature, checksums, one probe frame); an event
        names each one refused and why, so a corrupt deployed bundle costs a fall back, not a
        device that exits at every start."""
        refused: list[tuple[str, str]] = []
        seen: set[Path] = set()
        for path in self._bundle_candidates():
            if path is None or Path(path).resolve() in seen:
                continue
            seen.add(Path(path).resolve())
            try:
                rt = self._load(Path(path), self.cfg.threads, check_signature=True)
                self.probe(rt)
            except Exception as e:
                why = str(e) if isinstance(e, LeptonError) else f"{type(e).__name__}: {e}"
                refused.append((str(path), why[:500]))
                continue
            for p, why in refused:
                self.event("bundle_refused", f"bundle {p} refused at start ({why}); running {rt.path}", "warning",
                           refused=p, reason=why, using=str(rt.path))
            return rt
        if not refused:
            raise BadInput("no bundle: set `bundle` in the config (or --bundle)")
        if len(refused) == 1:
            raise BadInput(refused[0][1])
        raise BadInput("no usable bundle: " + "; ".join(f"{p}: {why}" for p, why in refused))

    def _swap(self, rt: Runtime) -> Runtime:
        with self._rt_lock:
            old = self.pipeline.swap(rt)
            self.runtime = rt
        return old

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

        # the bundle's latency budget: the monitor's p95 alert holds a device to it (else a default of its own)
        rt = self.runtime
        budget = rt.bundle.manifest.target.get("latency_budget_ms") if rt.bundle else None
        meta = Meta(boot_id=self.boot_id, software=__version__,
                    bundle=BundleInfo(**self._bundle_info(), latency_budget_ms=budget),
                    source=self.source.spec, window_s=self.window_s, telemetry=self.telemetry,
                    hardware=Hardware(machine=platform.machine(), system=platform.system(),
                                      python=platform.python_version(), node=platform.node()))
        self._publisher.publish_now(self.topics.meta, _json(meta), retain=True)

    @property
    def _publisher(self) -> Publisher:
        """The publisher, made at the end of __init__ (None only before: events then wait in the outbox)."""
        if self.publisher is None:
            raise RuntimeError("the agent's publisher is made at the end of __init__")
        return self.publisher

    def _on_message(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Paho's thread: decide before keeping anything. Too big or not a valid command: an error reply
        (rate-limited), nothing queued; retained: ignored with an event; queue full in count or bytes:
        dropped. Only parsed, valid commands wait for the command thread."""
        parsed = Topics.parse(topic)
        if not parsed or not parsed[2].startswith("cmd/"):
            return
        verb = parsed[2][4:]
        safe_verb = verb if verb.isidentifier() and len(verb) <= 64 else "unknown"
        n = len(payload)
        if retain:
            self._rate_event("command_ignored", f"retained {safe_verb} command ignored: only live commands are acted "
                             "on (a retained one would run again at every start)", "warning", verb=safe_verb)
            return
        if n > MAX_COMMAND_BYTES:
            if self._take_reject_token():
                self.reply(safe_verb, None, False, f"payload of {n} bytes exceeds {MAX_COMMAND_BYTES}")
            self._rate_event("command_error", f"{safe_verb}: payload of {n} bytes exceeds {MAX_COMMAND_BYTES}; "
                             "refused before queueing", "warning", verb=safe_verb, bytes=n)
            return
        try:  # parsed here, not in the command thread: a flood of junk never takes a queue slot from a ping
            cmd = commands.parse(verb, payload)
        except commands.CommandError as e:
            self._refuse(safe_verb, e)
            return
        with self._qlock:
            fits = self._queued_bytes + n <= MAX_QUEUED_COMMAND_BYTES
            if fits:
                try:
                    self._commands.put_nowait((verb, cmd, n))
                    self._queued_bytes += n
                except queue.Full:
                    fits = False
        if not fits:
            self._rate_event("command_error", "command queue full; command dropped", "warning", verb=safe_verb)

    def _refuse(self, safe_verb: str, e: commands.CommandError) -> None:
        """A command that does not parse: an error reply and an event, both rate-limited, as for an
        oversized one (junk sent at 150/s made as many events, and the monitor's flood limit then
        refused the device's own telemetry)."""
        if self._take_reject_token():
            self.reply(safe_verb, e.command_id, False, str(e))
        self._rate_event("command_error", f"{safe_verb}: {e}", "warning", verb=safe_verb)

    def _take_reject_token(self) -> bool:
        with self._rate_lock:
            now = time.monotonic()
            self._reject_tokens = min(REJECT_BURST, self._reject_tokens + (now - self._reject_at) * REJECT_PER_S)
            self._reject_at = now
            if self._reject_tokens < 1:
                return False
            self._reject_tokens -= 1
            return True

    def _rate_ok(self, key: str) -> tuple[bool, int]:
        """(send now, how many were suppressed since the last one) for a repeating kind."""
        with self._rate_lock:
            now = time.monotonic()
            last, suppressed = self._rate.get(key, (-RATE_LIMIT_S, 0))
            if now - last < RATE_LIMIT_S:
                self._rate[key] = (last, suppressed + 1)
                return False, 0
            self._rate[key] = (now, 0)
            return True, suppressed

    def _rate_event(self, kind: str, message: str, level: str = "info", **data) -> None:
        ok, suppressed = self._rate_ok(f"event:{kind}")
        if ok:
            if suppressed:
                message += f" ({suppressed} more like it not reported)"
            self.event(kind, message, level, suppressed=suppressed, **data)

    def _rate_log(self, key: str, message: str) -> None:
        ok, suppressed = self._rate_ok(f"log:{key}")
        if ok:
            self.log(f"{key}: {message}" + (f" ({suppressed} more like it)" if suppressed else ""), "warning")

    def _on_source_status(self, u: StatusUpdate) -> None:
        """The source's status callbacks as events: losing the stream or giving up (warning), frames
        again after a reconnect, batches of dropped frames. Not the start (the `started` event says
        it), nor the end (`source_ended`, or our own stop). Runs in the capture thread: never raises."""
        try:
            data = {"source": u.source, "source_kind": u.source_kind, "state": u.state.value}
            if u.kind == "reconnect":
                self._rate_event("source_reconnected", f"source {u.source} is back: {u.reason}", "info",
                                 reconnects=u.count, down_s=u.down_s, **data)
            elif u.kind == "dropped":
                self._rate_event("frames_dropped", f"source {u.source}: {u.reason}", "info", count=u.count,
                                 total=u.total, policy=self.source.policy.value, **data)
            elif u.state in (SourceState.RECONNECTING, SourceState.FAILED) and not (
                    getattr(self, "_stop", None) and self._stop.is_set()):  # it may come before __init__ ends
                self._rate_event("source_state", f"source {u.source}: {u.previous.value if u.previous else '?'} -> "
                                 f"{u.state.value}" + (f" ({u.reason})" if u.reason else ""),
                                 "warning", previous=u.previous.value if u.previous else None, reason=u.reason,
                                 **data)
        except Exception as e:
            self._survive("source status", e)

    def _survive(self, where: str, e: BaseException) -> None:
        """A thread's work failed: say so (rate-limited) and let the thread go on. Never raises."""
        try:
            self._rate_event("error", f"{where}: {type(e).__name__}: {str(e)[:500]}", "error", where=where)
        except Exception:
            pass

    def send(self, topic: str, payload: bytes, carried: int = 0) -> bool:
        """Every message the agent originates goes through the outbox (QoS 1, nothing lost). A
        full or broken disk makes this return False (counted, logged now and then), never raise:
        every thread calls it, and none may end because the disk did. `carried`: the drop count a
        window reports, handed on by the outbox if the window itself is dropped."""
        try:
            stored = self.outbox.put(topic, payload, carried=carried) != 0  # 0: dropped (a full disk), counted
        except Exception as e:  # sqlite3.Error, OSError (ENOSPC, EROFS), whatever else the disk does
            self._send_failures += 1
            self._rate_log("outbox", f"cannot store a message ({type(e).__name__}: {e}); "
                                     f"{self._send_failures} lost since start")
            stored = False
        if not stored:
            # A reply or an event is worth more than a window: send it straight to a connected broker
            # (QoS 1, not kept), so a full disk does not also silence the device's answers.
            if topic != self.topics.telemetry and self.publisher is not None:
                return self.publisher.publish_now(topic, payload)
            return False
        if self.publisher is not None:
            self.publisher.wake()
        return True

    def log(self, message: str, level: str = "info") -> None:
        """One line about the agent at the event's level, so `--quiet` keeps warnings and errors and the
        journal gets priorities; a caller-given sink (the quickstart) gets the plain line instead."""
        if self._line is not None:
            self._line(message)
        else:
            _log.log(_LEVELS.get(level, logging.INFO), message)

    def event(self, kind: str, message: str, level: str = "info", **data) -> None:
        self.log(f"{kind}: {message}", level)
        self.send(self.topics.events, _json(Event(boot_id=self.boot_id, kind=kind, level=level,
                                                  message=message[:MAX_EVENT_MESSAGE], data=data)))

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
        try:
            outbox_dropped = self.outbox.take_dropped()
        except Exception as e:  # a failing disk: the window is still made (and its loss shows as a seq gap)
            outbox_dropped = 0
            self._rate_log("outbox count", f"cannot read the drop count ({type(e).__name__}: {e})")
        t = Telemetry(boot_id=self.boot_id, seq=self.seq, window_s=self.window_s, frames=snap["window_frames"],
                      fps=snap["fps"], dropped=src["dropped"] - prev[0], corrupt=corrupt - prev[1], latency_ms=lat,
                      bundle={"name": self.runtime.name, "sha256": self._bundle_info().get("sha256")},
                      outbox_dropped=outbox_dropped, source=src, **self.health.sample())
        self._prev_counts = (src["dropped"], corrupt)
        self.send(self.topics.telemetry, _json(t), carried=outbox_dropped)
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
            try:
                verb, cmd, n = item
                with self._qlock:
                    self._queued_bytes -= n
                self._command(verb, cmd)
            except Exception as e:  # whatever a command does, the next one is answered
                self._survive("commands", e)

    def _command(self, verb: str, cmd) -> None:
        """A parsed command (see _on_message), in the command thread."""
        try:
            self.handle(verb, cmd)
        except Exception as e:  # a failing command is a reply and an event, never the agent's end
            self.reply(verb, cmd.id, False, f"{type(e).__name__}: {e}")
            self.event("error", f"{verb} failed: {e}", "error")

    def handle(self, verb: str, cmd) -> None:
        if isinstance(cmd, PingCommand):
            self.reply("ping", cmd.id, True, boot_id=self.boot_id, seq=self.seq, uptime_s=round(
                time.monotonic() - self._started, 3), outbox=len(self.outbox), bundle=self._bundle_info(),
                pipeline_error=self.pipeline_error, deploying=self._deploying.locked())
        elif isinstance(cmd, SetCommand):
            self._set(cmd)
        elif isinstance(cmd, DeployCommand):
            if not self._deploying.acquire(blocking=False):
                self.reply("deploy", cmd.id, False, "another deploy is in progress")
                return
            try:  # a worker: a long download must not keep pings (or the next deploy's refusal) waiting
                threading.Thread(target=self._deploy_worker, args=(cmd,), name="agent:deploy", daemon=True).start()
            except BaseException:
                self._deploying.release()
                raise

    def _set(self, cmd: SetCommand) -> None:
        """A `set` applies whole or not at all: threads first (the one field that can be refused, during a
        deploy, or fail, loading the model again), then the others. Why: window_s, telemetry and
        sample_every used to change before a refused threads, with a reply saying ok false, no event and
        no new meta."""
        changed: dict[str, Any] = {}
        if cmd.threads is not None:
            if not self._deploying.acquire(blocking=False):  # a deploy's health check owns the runtime
                self.reply("set", cmd.id, False, "a deploy is in progress; change threads after it")
                return
            try:
                if self.runtime.path is None:  # never: the agent's runtimes are loaded from bundles
                    raise RuntimeError("the running model has no path to load again with other threads")
                rt = self._open(self.runtime.path, cmd.threads)
                self.probe(rt)
                self._swap(rt)
            finally:
                self._deploying.release()
            changed["threads"] = cmd.threads
        if cmd.window_s is not None:
            self.window_s = changed["window_s"] = cmd.window_s
        if cmd.telemetry is not None:
            self.set_telemetry(cmd.telemetry)
            changed["telemetry"] = cmd.telemetry
        if cmd.sample_every is not None:
            self.pipeline.sample_every = changed["sample_every"] = cmd.sample_every
        self.reply("set", cmd.id, True, **changed)
        self.event("set", f"settings changed: {changed}", **changed)
        self._publish_meta()

    def deploy(self, cmd: DeployCommand) -> None:
        """Fetch and verify while the old model serves; swap; health-check; keep or roll back.
        Runs in the caller's thread (the command thread starts a worker for it instead)."""
        if not self._deploying.acquire(blocking=False):
            self.reply("deploy", cmd.id, False, "another deploy is in progress")
            return
        self._deploy_worker(cmd)

    def _deploy_worker(self, cmd: DeployCommand) -> None:
        """Runs with self._deploying held; releases it whatever happens."""
        try:
            self._deploy(cmd)
        except Exception as e:
            self.reply("deploy", cmd.id, False, f"{type(e).__name__}: {e}")
            self._survive("deploy", e)
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
            new = self._open(path, self.cfg.threads)
            self.probe(new)  # before the swap: a model that fails on a frame never replaces one that works
        except Exception as e:
            why = str(e) if isinstance(e, LeptonError) else f"{type(e).__name__}: {e}"
            self.store.discard(path)
            self.reply("deploy", cmd.id, False, f"rolled back: the new bundle does not load or run ({why[:500]})")
            self.event("rollback", f"{where}: does not load or run: {why[:500]}", "warning", source=where)
            return
        failures = self.pipeline_failures
        old = self._swap(new)
        ok, why, figures = self._health_check(new, cmd.health_frames or self.cfg.health_frames, failures)
        if not ok:
            return self._roll_back(cmd, path, new, old, why, figures)
        try:
            self.store.set_current(path)
        except OSError as e:  # (a full disk: nothing was changed) the device runs what `current` names
            why = f"cannot record it as the current bundle in {self.cfg.state_dir}: {e.strerror or e}"
            return self._roll_back(cmd, path, new, old, why, figures)
        self.reply("deploy", cmd.id, True, bundle=self._bundle_info(), **signed, **figures)
        self.event("deploy", f"now running {new.name} from {where}", bundle=self._bundle_info(), **figures)
        self._publish_meta()

    def _roll_back(self, cmd: DeployCommand, path: Path, new: Runtime, old: Runtime, why: str, figures: dict) -> None:
        """The old model back in the pipeline, the new bundle removed, the reply and a `rollback` event."""
        self._swap(old)
        self.store.discard(path)
        self.reply("deploy", cmd.id, False, f"rolled back: {why}", **figures)
        self.event("rollback", f"{new.name}: {why}; back to {old.name}", "warning", **figures)

    def _health_check(self, rt: Runtime, frames: int, failures: int) -> tuple[bool, str, dict]:
        """N frames through the new model: inference p50 must be within the target's latency budget.
        A pipeline failure since the swap (not an old one) fails the check."""
        deadline = time.monotonic() + self.cfg.health_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.pipeline_failures != failures:
                return False, f"the pipeline failed: {self.pipeline_error}", {}
            if self.pipeline.failed_since_swap:  # a model that fails on some frames only: not healthy either
                if self._pipeline_ends(failures):  # (one failing on every frame ends the pipeline in a few)
                    return False, f"the pipeline failed: {self.pipeline_error}", {}
                return False, (f"{self.pipeline.failed_since_swap} frame(s) failed since the swap: "
                               f"{self.pipeline.last_failure}"), {}
            if len(self.pipeline.probe or ()) >= frames:
                break
            time.sleep(0.02)
        seen = list(self.pipeline.probe or ())
        s = summarize(seen)
        if s is None or len(seen) < frames:
            return False, f"only {len(seen)} of {frames} health-check frames in {self.cfg.health_timeout_s:g} s", {}
        budget = rt.bundle.manifest.target.get("latency_budget_ms") if rt.bundle else None
        figures = {"health_frames": len(seen), "inference_p50_ms": round(s["p50"], 4),
                   "inference_p95_ms": round(s["p95"], 4), "latency_budget_ms": budget}
        if budget is not None and s["p50"] > budget:
            return False, f"inference p50 {s['p50']:.3f} ms exceeds the {budget:g} ms latency budget", figures
        return True, "", figures

    def _pipeline_ends(self, failures: int, grace_s: float = 0.5) -> bool:
        """Whether the pipeline fails (its failure count moves past `failures`) within `grace_s`. Why: a new
        model failing on every frame ends the pipeline after FAILS_BEFORE_FIRST frames, and the reply should
        give that failure, the whole story, not "2 frame(s) failed" caught between two of them."""
        deadline = time.monotonic() + grace_s
        while self.pipeline_failures == failures and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.01)
        return self.pipeline_failures != failures

    # ---- the service --------------------------------------------------------------------------
    def _pipeline_loop(self) -> None:
        """Run the pipeline; when it fails, say so and start it again (with backoff) on the runtime
        current by then (a deploy's rollback puts the old one back)."""
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                for _ in self.pipeline:
                    if self._stop.is_set():
                        break
                if not self._stop.is_set():
                    self.source_ended = True
                    self.event("source_ended", f"source {self.source.spec} ended", "warning")
                return
            except Exception as e:
                self.pipeline_error = f"{type(e).__name__}: {str(e)[:500]}"
                self.pipeline_failures += 1
                failures = 1 if time.monotonic() - started > 60 else failures + 1  # ran a while: a fresh failure
                delay = min(self.cfg.max_backoff_s, 0.25 * 2 ** (failures - 1))
                self.event("error", f"pipeline stopped: {self.pipeline_error}; restarting in {delay:g} s", "error",
                           where="pipeline", restart_in_s=delay)
            if self._stop.wait(delay):
                return
            try:
                self._restart_pipeline()
            except Exception as e:
                self._survive("pipeline restart", e)

    def _restart_pipeline(self) -> None:
        """A new Pipeline over the same source and the current runtime, keeping the statistics."""
        with self._rt_lock:
            old = self.pipeline
            new = Pipeline(self.source, self.runtime)
            new.stats, new.bad_frames, new.sample_every = old.stats, old.bad_frames, old.sample_every
            new.probe, new.preprocess_on_capture = old.probe, old.preprocess_on_capture
            new.failed_since_swap, new.last_failure = old.failed_since_swap, old.last_failure
            self.pipeline = new
        self.pipeline_error = None

    def stop(self, *_args) -> None:
        if not self._stop.is_set():
            self.notifier.stopping("stopping: last window, offline status, outbox flush")
        self._stop.set()
        try:
            self._commands.put_nowait(None)  # wake the command thread
        except queue.Full:
            pass

    def request_stop(self, *_args) -> None:
        """The signal handlers' stop: a flag and nothing else; run() sees it within STOP_POLL_S and calls
        stop(). Why: stop() sets an Event, and the main thread holds that Event's lock while it waits on it
        (run's loop). A SIGINT or SIGTERM landing there made stop() wait for a lock its own thread held: the
        agent hung for good, pipeline still running (one was found 48 minutes on, at 90 % of a core, under
        a loaded test run), and only SIGKILL ended it: no last window, no offline status."""
        self._stop_requested = True

    def run(self, install_signals: bool = True) -> int:
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        self._started = time.monotonic()
        self._publisher.start()
        threads = [threading.Thread(target=self._pipeline_loop, name="agent:pipeline", daemon=True),
                   threading.Thread(target=self._command_loop, name="agent:commands", daemon=True)]
        for t in threads:
            t.start()
        self.event("started", f"{self.runtime.name} on {self.source.kind} {self.source.spec}",
                   bundle=self._bundle_info(), boot_id=self.boot_id)
        if not self.cfg.trusted_keys:
            self.event("insecure", f"no trusted keys configured: anyone with publish rights on "
                       f"{self.topics.cmd('#')} can deploy any bundle to this device (set trusted_keys)", "warning")
        self._report_outbox()
        next_window = time.monotonic() + self.window_s
        next_tick = time.monotonic() if self.notifier.enabled else float("inf")
        while not self._stop.is_set():
            if self._stop_requested:
                self.stop()
                break
            wake = min(next_window, next_tick, time.monotonic() + STOP_POLL_S)
            if self._stop.wait(max(0.0, wake - time.monotonic())):
                break
            if time.monotonic() >= next_tick:
                try:
                    self._notify_tick()
                except Exception as e:
                    self._survive("systemd notify", e)
                next_tick = time.monotonic() + self._tick_s()
            if time.monotonic() < next_window:
                continue
            try:
                self._report_outbox()
                if self.telemetry:
                    self.window()
            except Exception as e:  # a window that cannot be made or stored is lost, not the agent
                self._survive("window", e)
            next_window += self.window_s
            if next_window < time.monotonic():  # fell behind (suspend, a slow disk): do not burst
                next_window = time.monotonic() + self.window_s
        return self._shutdown()

    # ---- systemd ------------------------------------------------------------------------------
    def _tick_s(self) -> float:
        """Until READY, a tenth of a second (start-up time is what `systemctl start` waits for);
        then half the watchdog period (systemd's advice), or 10 s for STATUS= alone."""
        if not self.ready:
            return 0.1
        return self.notifier.watchdog_s / 2 if self.notifier.watchdog_s else 10.0

    def _progress(self) -> int:
        """Frames taken from the source plus results out of the model: both stop when capture hangs
        (the reader waits) or inference does (the bounded queue fills, so the reader stops too)."""
        return int(self.source.captured) + int(self.pipeline.stats.frames) + int(self.pipeline.bad_frames)

    def _notify_tick(self) -> None:
        now, flow = time.monotonic(), self._progress()
        fps = self.pipeline.stats.fps()
        line = (f"{fps:.1f} fps" if fps else "no fps yet") + f", {self.pipeline.stats.frames} results, " \
               f"{self.runtime.name} on {self.source.kind}"
        if not self.ready:
            if self.pipeline.stats.frames > 0 or self.source_ended:
                self.ready = True
                self._flow_seen, self._flow_at = flow, now
                self.notifier.ready(line)
            return
        if flow != self._flow_seen or self.source_ended:
            self._flow_seen, self._flow_at, self._stall_told = flow, now, False
            self.notifier.watchdog(("source ended, idle; " if self.source_ended else "") + line)
            return
        stalled = now - self._flow_at
        self.notifier.status(f"stalled: no frame for {stalled:.0f} s; watchdog pings withheld")
        if not self._stall_told:  # one event per stall, not one per tick through an hour-long outage
            self._stall_told = True
            self.event("stalled", f"no frame from {self.source.spec} or the model for {stalled:.0f} s; watchdog "
                       "pings withheld (under a systemd watchdog the agent is restarted)", "warning",
                       stalled_s=round(stalled, 1))

    def _report_outbox(self) -> None:
        """One event for what happened to the outbox's file (a corrupt file moved aside, a fall back to
        memory on a full or read-only disk, the way back): the operator learns it once, not per window."""
        note = self.outbox.take_recovered()
        if note:
            self.event("outbox", note, "warning", recovered=self.outbox.recovered, degraded=self.outbox.degraded)

    def _shutdown(self) -> int:
        """Last window, 'stopped' event, offline status, flush what the broker will take, exit 0.
        Each step is tried on its own: a full disk must not keep the status from going offline."""
        steps = [lambda: self.telemetry and self.window(), lambda: self.event("stopped", "graceful stop"),
                 lambda: self._publisher.flush(timeout=5.0),
                 lambda: self._publisher.publish_now(self.topics.status, _json(Status(
                     online=False, boot_id=self.boot_id, version=__version__)), retain=True, timeout=2.0),
                 self._publisher.stop, self.pipeline.close]
        for step in steps:
            try:
                step()
            except Exception as e:
                self.log(f"stopping: {type(e).__name__}: {e}", "error")
        left: int | str
        lost = None
        try:
            self.outbox.close()  # (one in memory tries its file first)
            left, lost = len(self.outbox), self.outbox.degraded
        except Exception as e:
            left = f"? ({type(e).__name__}: {e})"
        if lost and left:  # in memory: nothing is left for the next start, whatever the count
            self.log(f"stopped; {left} message(s) lost: the outbox was in memory ({lost})", "warning")
        else:
            self.log(f"stopped; {left} message(s) left in the outbox for the next start")
        return 0
