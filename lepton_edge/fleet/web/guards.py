"""What the dashboard's HTTP server refuses before the app sees a request: a Host it does not answer to,
and connections that never finish a request or come in more than it can hold.

Why here, not in the app: both are about the socket and the address the server was bound to
(`WebServer`), and the app (`create_app`) is also served by tests and other ASGI servers.
- DNS rebinding: a web page the operator visits can point its own domain at 127.0.0.1 and is then the
  same site as a dashboard on loopback: it read the fleet, alerts, events, /metrics and the live stream
  (the token guards commands only). A dashboard bound to loopback answers only to loopback names; one
  bound beyond it (0.0.0.0, a LAN address: the same attack through that address) answers to addresses,
  this machine's own names and the names it was told of (--web-host).
- Slowloris: uvicorn's h11 protocol times a connection only after a response, so a connection that sent
  half its headers stayed open for ever; 300 of them held the server's 256 file descriptors, every
  legitimate request timed out and the accept loop's errors wrote 292 MB of log in 40 s.
- One client holding every slot: the cap on open connections was global only, so one address opening 300
  idle connections (each renewed within the header timeout) locked every other client out; an address
  now holds at most MAX_PER_PEER of them.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from lepton_edge.fleet.web.app import _client_key  # (app imports this module only inside WebServer)

HEADER_TIMEOUT_S = 10.0  # from the connection (or the last response) to a request's complete headers
MAX_CONNECTIONS = 256  # open connections; one more is closed at once (64 live streams fit with room)
MAX_PER_PEER = 64  # open connections of one remote address (an IPv6 /64); 127.0.0.1 and ::1 only by the above
# (64: a reverse proxy on another host, a container bridge, brings every operator from one address)
FD_RESERVE = 64  # file descriptors left for everything else when the process may open few (connection_cap)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class HostPolicy:
    """The Host names a server answers to, and whether any IP address given as the Host is answered too
    (a server bound beyond loopback: a browser that sends an address was sent to this server by it,
    and DNS rebinding needs a name)."""
    names: frozenset[str]
    any_address: bool = False

    def allows(self, header: str) -> bool:
        name = host_name(header)
        if name in self.names:
            return True
        if not self.any_address:
            return False
        try:
            ipaddress.ip_address(name.split("%")[0])
            return True
        except ValueError:
            return False


def _own_names() -> set[str]:
    """This machine's names as a LAN would reach it: its host name, that name under .local (mDNS: a
    Raspberry Pi's `raspberrypi.local`), and its fully qualified name."""
    try:
        host = socket.gethostname().lower().rstrip(".")
        return {n for n in (host, f"{host}.local", socket.getfqdn().lower().rstrip(".")) if n}
    except OSError:
        return set()


def binds_loopback(bind_host: str) -> bool:
    """Whether a server bound to `bind_host` listens on loopback addresses only: the name resolved, not
    matched, so LOCALHOST, 127.1 and a host name /etc/hosts maps to 127.0.1.1 count; a name that does
    not resolve does not."""
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(bind_host, None, proto=socket.IPPROTO_TCP)}
        return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)
    except (OSError, ValueError, UnicodeError):
        return False


def allowed_hosts(bind_host: str, extra: tuple[str, ...] = ()) -> HostPolicy:
    """What a server bound to `bind_host` answers to. On loopback: loopback names only (and `extra`).
    Beyond loopback: any IP address, this machine's own names, the bind name and `extra`; other names get
    421, as a page rebinding its domain to this machine's LAN address would (as Django's ALLOWED_HOSTS)."""
    names = LOOPBACK_NAMES | {bind_host.lower().rstrip("."), *(h.lower().rstrip(".") for h in extra)}
    if binds_loopback(bind_host):
        return HostPolicy(frozenset(names))
    return HostPolicy(frozenset(names | _own_names()), any_address=True)


def host_name(header: str) -> str:
    """The name in a Host header, without its port or a final dot ('[::1]:8080' -> '::1',
    'Example.com.:80' -> 'example.com')."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else ""
    return (header.rsplit(":", 1)[0] if header.count(":") == 1 else header).rstrip(".")


def connection_cap() -> int:
    """MAX_CONNECTIONS, or fewer where this process may open fewer files (a reserve kept for the store,
    the broker and logs). Why: under a 256-file limit descriptors ran out before 256 connections, the
    cap never engaged, and asyncio's failing accept() wrote 58 MB of log."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, soft - FD_RESERVE))


def peer_cap() -> int:
    """Connections one remote address may hold: MAX_PER_PEER, or a quarter of connection_cap() where that is
    smaller, so one address never takes every slot (nor, under a small file limit, most of them)."""
    return max(1, min(MAX_PER_PEER, connection_cap() // 4))


def peer_key(transport) -> str | None:
    """Who holds a connection, for the per-address cap: the IPv4 address or the IPv6 /64 (one host's
    addresses, as the live streams count them), or None for this machine's own 127.0.0.1 and ::1 (a
    browser on it and a reverse proxy in front, which brings every operator's connections from one
    address) and for a peer without an address (a Unix socket): those only count against the global cap."""
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) and peer and isinstance(peer[0], str) else ""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")):
        return None
    return _client_key(str(ip))


class HostCheck:
    """ASGI middleware: a request whose Host the policy does not allow gets 421 and one JSON line."""

    def __init__(self, app, allowed: HostPolicy):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            if not self.allowed.allows(host):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"error": f"this dashboard does not answer to host {host[:100]!r} (a name it "
                                             "should answer to: add it with --web-host)"}).encode()
                await send({"type": "http.response.start", "status": 421,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers (from the connection, and from the
    end of each response on a kept-alive one), a cap on open connections and a lower one per address."""

    _headers_timer = None
    _peer: str | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._peer = peer_key(transport)
        if len(self.connections) >= connection_cap() or self._peer_full():
            self.transport = transport  # (connection_lost closes it and reads this)
            transport.close()
            return
        super().connection_made(transport)
        self._arm()

    def _peer_full(self) -> bool:
        """Whether this connection's address already holds peer_cap() connections (a scan of at most
        MAX_CONNECTIONS: no count to keep right across the server's closes)."""
        if self._peer is None:
            return False
        return sum(1 for c in self.connections if getattr(c, "_peer", None) == self._peer) >= peer_cap()

    def _arm(self) -> None:
        self._disarm()
        self._headers_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)

    def _disarm(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_late(self) -> None:
        self._headers_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request in progress: still waiting on one
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:  # a request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
