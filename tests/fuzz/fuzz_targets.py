"""One checker per parser that takes outside input, shared by the hypothesis tests and the atheris
harness: feed it bytes (or a structured value), it runs the real parser and lets through only the
documented error type. Anything else escaping (RecursionError, UnicodeDecodeError, TypeError,
KeyError...) or an input that takes longer than its budget is a failure.

Why one module for both fuzzers: the invariant is the parser's contract, not the fuzzer's, and
the committed corpus under corpus/<parser>/ is replayed through the same functions by pytest.
"""
from __future__ import annotations

import base64
import contextlib
import json
import signal
import tempfile
from pathlib import Path

BUDGET_S = 10.0  # one input, any parser: far above the slowest legitimate case (a few ms)


class Hang(Exception):
    """An input took longer than BUDGET_S: a hang the agent would suffer too."""


@contextlib.contextmanager
def budget(seconds: float = BUDGET_S):
    """A hard wall-clock limit (SIGALRM, main thread only; elsewhere no limit)."""
    def _fire(*_):
        raise Hang(f"input took more than {seconds:g} s")

    try:
        old = signal.signal(signal.SIGALRM, _fire)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _text(data: bytes | str) -> str:
    return data if isinstance(data, str) else data.decode("utf-8", "surrogateescape")


# ---- command payloads: parse(verb, payload) -> a model, or CommandError --------------------------
VERBS = ("ping", "set", "deploy")


def check_command(data: bytes, verb: str = "ping"):
    from lepton_edge.agent import commands
    from lepton_edge.telemetry.schema import MAX_COMMAND_BYTES

    with budget():
        try:
            cmd = commands.parse(verb, data)
        except commands.CommandError:
            return None
    assert len(data) <= MAX_COMMAND_BYTES, "a payload over the size limit was accepted"
    assert type(cmd).__name__.lower().startswith(verb), (verb, cmd)
    if verb == "set":  # strict types: `true` is not a thread count, "no" is not a boolean
        assert cmd.threads is None or type(cmd.threads) is int
        assert cmd.telemetry is None or type(cmd.telemetry) is bool
        assert cmd.sample_every is None or type(cmd.sample_every) is int
    return cmd


# ---- manifests: Bundle.load on a directory holding these manifest.json bytes -> Bundle or BadInput
def make_bundle(root: Path, model: bytes = b"\x08\x01 not really onnx", labels: str | None = "a\nb\n") -> Path:
    """A small bundle whose files and checksums are right (no export needed): enough for every
    check Bundle.load and signing make."""
    import hashlib

    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(model)
    if labels is not None:
        (root / "labels.txt").write_text(labels)
    files = {f.name: {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
             for f in sorted(root.iterdir()) if f.name in ("model.onnx", "labels.txt")}
    m = {"schema_version": 1, "name": "fuzz", "version": "1", "created": "2026-01-01T00:00:00+00:00",
         "target": {"id": "x86-cpu", "threads": 2, "latency_budget_ms": 50.0, "delegates": []},
         "format": "onnx", "precision": "int8", "model_file": "model.onnx", "task": "classify",
         "labels_file": "labels.txt" if labels is not None else None,
         "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "dtype": "float32", "layout": "NCHW", "color": "GRAY",
                     "scale": 1 / 255, "mean": [0.0], "std": [1.0]}],
         "outputs": [{"name": "logits", "shape": [1, 10], "dtype": "float32"}], "files": files}
    (root / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")  # by hand: the test owns its bytes
    return root


def _inside(root: Path, rel: str) -> bool:
    p = (root / rel).resolve()
    return p == root.resolve() or root.resolve() in p.parents


def check_manifest(data: bytes, with_files: bool = True):
    """Bundle.load(dir) on these bytes as manifest.json: a Bundle, or BadInput. When it loads,
    every path it names (model, labels, listed files) is inside the bundle and listed."""
    from lepton_edge.bundle import MANIFEST, Bundle
    from lepton_edge.errors import BadInput

    with tempfile.TemporaryDirectory(prefix="fuzz-manifest-") as d:
        root = Path(d) / "b"
        if with_files:
            make_bundle(root)
        else:
            root.mkdir()
        (root / MANIFEST).write_bytes(data)
        with budget():
            try:
                b = Bundle.load(root)
            except BadInput:
                return None
        m = b.manifest
        assert _inside(root, m.model_file), f"model_file outside the bundle: {m.model_file!r}"
        assert m.model_file in m.files, f"model_file {m.model_file!r} is not listed in files"
        if m.labels_file:
            assert _inside(root, m.labels_file) and m.labels_file in m.files, f"labels_file {m.labels_file!r}"
        for rel in m.files:
            assert _inside(root, rel), f"listed file outside the bundle: {rel!r}"
        return b


# ---- signatures: signing.verify with these bytes as the signature file -> key id or BadInput ----
_KEYS: dict = {}


def _keypair():
    if not _KEYS:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        # a fixed test key, so the committed corpus's valid signature stays valid
        k = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
        _KEYS["private"], _KEYS["public"] = k, k.public_key()
    return _KEYS["private"], _KEYS["public"]


def valid_signature(root: Path) -> bytes:
    from lepton_edge.bundle import MANIFEST
    from lepton_edge.signing import key_id

    priv, pub = _keypair()
    sig = priv.sign((root / MANIFEST).read_bytes())
    return json.dumps({"alg": "ed25519", "key_id": key_id(pub), "signature": base64.b64encode(sig).decode()}).encode()


def check_signature(data: bytes):
    from lepton_edge.errors import BadInput
    from lepton_edge.signing import SIGNATURE, verify

    _, pub = _keypair()
    with tempfile.TemporaryDirectory(prefix="fuzz-sig-") as d:
        root = make_bundle(Path(d) / "b")
        good = valid_signature(root)
        (root / SIGNATURE).write_bytes(data)
        with budget():
            try:
                kid = verify(root, [pub])
            except BadInput:
                return None
        # accepted: then it must be a real signature over this manifest by the trusted key
        sig = json.loads(data)
        assert base64.b64decode(sig["signature"]) == base64.b64decode(json.loads(good)["signature"])
        return kid


# ---- target profile TOML: targets.load(path) -> Profile or BadInput ----------------------------
def check_profile(data: bytes):
    from lepton_edge import targets
    from lepton_edge.errors import BadInput

    with tempfile.TemporaryDirectory(prefix="fuzz-profile-") as d:
        p = Path(d) / "fuzz.toml"
        p.write_bytes(data)
        with budget():
            try:
                prof = targets.load(p)
            except BadInput:
                return None
        import math

        assert math.isfinite(prof.latency_budget_ms), "a non-finite latency budget was accepted"
        return prof


# ---- agent TOML: agent.config.load(path, {}) -> AgentConfig or BadInput ------------------------
def check_agent_config(data: bytes):
    from lepton_edge.agent import config
    from lepton_edge.errors import BadInput

    with tempfile.TemporaryDirectory(prefix="fuzz-agent-") as d:
        p = Path(d) / "agent.toml"
        p.write_bytes(data)
        with budget():
            try:
                return config.load(p, {})
            except BadInput:
                return None


# ---- --input-spec: parse_overrides(text) then apply_overrides(spec, ...) -> InputSpec or BadInput
def check_input_spec(data: bytes | str):
    from lepton_edge.bundle import InputSpec
    from lepton_edge.errors import BadInput
    from lepton_edge.runtime.spec import apply_overrides, parse_overrides

    text = _text(data)
    base = InputSpec(name="input", shape=[1, 3, 224, 224])
    with budget():
        try:
            over = parse_overrides(text)
            spec = apply_overrides(base, over)
        except BadInput:
            return None
    assert len(spec.shape) == len(base.shape), spec.shape
    return spec


# ---- broker URLs: parse_broker(text) -> BrokerAddress or BadInput ------------------------------
def check_broker(data: bytes | str):
    from lepton_edge.errors import BadInput
    from lepton_edge.telemetry.broker import SCHEMES, parse_broker

    text = _text(data)
    with budget():
        try:
            a = parse_broker(text)
        except BadInput:
            return None
    assert 0 < a.port < 65536 and a.host and a.transport in {t for _, _, t in SCHEMES.values()}, a
    return a


# ---- telemetry payloads as the monitor reads them: Telemetry.model_validate_json -> ValidationError
def check_telemetry(data: bytes):
    from pydantic import ValidationError

    from lepton_edge.telemetry.schema import Telemetry

    with budget():
        try:
            return Telemetry.model_validate_json(data)
        except ValidationError:
            return None


CHECKS = {"command": check_command, "manifest": check_manifest, "signature": check_signature,
          "profile": check_profile, "agent_config": check_agent_config, "input_spec": check_input_spec,
          "broker": check_broker, "telemetry": check_telemetry}


def check_bytes(parser: str, data: bytes):
    """The atheris/corpus entry: command corpus files carry their verb as a first line `verb\\n`."""
    if parser == "command":
        head, sep, rest = data.partition(b"\n")
        verb = head.decode("ascii", "replace") if sep and len(head) <= 16 else "ping"
        return check_command(rest if sep and len(head) <= 16 else data, verb)
    return CHECKS[parser](data)
