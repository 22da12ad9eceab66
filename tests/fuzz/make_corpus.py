"""Writes the seed corpus under tests/fuzz/corpus/<parser>/: real inputs and the known-bad ones
the adversarial pass of issue #10 found. Run once (`python tests/fuzz/make_corpus.py`) when adding
seeds; the files are committed so pytest replays them and atheris starts from them.

Command seeds start with a line naming the verb (`ping\\n{...}`), as fuzz_targets.check_bytes reads them.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import fuzz_targets as ft

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus"


def seeds() -> dict[str, dict[str, bytes]]:
    with tempfile.TemporaryDirectory() as d:
        good = ft.make_bundle(Path(d) / "b")
        manifest = json.loads((good / "manifest.json").read_text())
        signature = ft.valid_signature(good)

    def m(**edits) -> bytes:
        out = json.loads(json.dumps(manifest))
        for k, v in edits.items():
            out[k] = v
        return json.dumps(out, allow_nan=True).encode()

    def target(**t) -> bytes:
        return m(target=manifest["target"] | t)

    def inputs(**f) -> bytes:
        return m(inputs=[manifest["inputs"][0] | f])

    sig = json.loads(signature)
    window = {"v": 1, "ts": 1.0, "boot_id": "b", "seq": 0, "window_s": 10.0, "frames": 1, "fps": 1.0,
              "latency_ms": {"inference": {"p50": 1, "p95": 2, "p99": 3, "max": 4}}}
    profile = (ROOT / "targets" / "x86-cpu.toml").read_bytes()
    return {
        "command": {
            "ping_ok": b'ping\n{"id": "p1"}', "ping_empty": b"ping\n", "set_ok": b'set\n{"id": "s", "window_s": 0.5}',
            "deploy_ok": b'deploy\n{"id": "d", "url": "http://127.0.0.1:1/b.tar.gz"}',
            "open_brackets_60k": b"ping\n" + b"[" * 60_000,  # issue #10 severe 1: RecursionError killed the thread
            "open_objects_20k": b"ping\n" + b'{"a":' * 12_000,
            "over_limit": b"ping\n" + b"x" * (64 * 1024 + 1),
            "non_utf8": b"ping\n\xff\xfe{\x80}",
            "threads_true": b'set\n{"threads": true}', "telemetry_no": b'set\n{"telemetry": "no"}',
            "window_nan": b'set\n{"window_s": NaN}', "window_1e400": b'set\n{"window_s": 1e400}',
            "id_list": b'ping\n{"id": ["a"]}', "deploy_proc_self": b'deploy\n{"path": "/proc/self"}',
            "deploy_root": b'deploy\n{"path": "/"}', "deploy_ftp": b'deploy\n{"url": "ftp://x/b.tar.gz"}',
            "unknown_verb": b"reboot\n{}", "array": b"ping\n[1, 2]",
            "huge_int": b'set\n{"threads": ' + b"9" * 5000 + b"}",
        },
        "manifest": {
            "valid": json.dumps(manifest).encode(),
            "non_utf8": b'{"name": "\xff\xfe"}', "open_brackets_100k": b"[" * 20_000,
            "nested_objects": b'{"a":' * 20_000, "null": b"null", "list": b"[]", "empty": b"",
            "model_file_absolute": m(model_file="/etc/passwd"), "model_file_dotdot": m(model_file="../b/model.onnx"),
            "model_unlisted": m(files={k: v for k, v in manifest["files"].items() if k != "model.onnx"}),
            "labels_dotdot": m(labels_file="../../etc/hostname"),
            "files_dotdot": m(files=manifest["files"] | {"../escape": {"size": 1, "sha256": "0" * 64}}),
            "files_absolute": m(files=manifest["files"] | {"/etc/hostname": {"size": 1, "sha256": "0" * 64}}),
            "declared_100gb": m(files={k: v | {"size": 100 * 2 ** 30} for k, v in manifest["files"].items()}),
            "declared_negative": m(files={k: v | {"size": -1} for k, v in manifest["files"].items()}),
            "delegate_absolute": target(delegates=["/abs/libevil.so"]),
            "latency_inf": target(latency_budget_ms=float("inf")), "threads_lots": target(threads="lots"),
            "dtype_complex1024": inputs(dtype="complex1024"), "dtype_object": inputs(dtype="object"),
            "shape_text": inputs(shape=[1, 1, "h", 28]), "shape_huge": inputs(shape=[1, 1, 20000, 20000]),
            "scale_nan": inputs(scale=float("nan")),
        },
        "signature": {
            "valid": signature, "key_id_list": json.dumps(sig | {"key_id": [sig["key_id"]]}).encode(),
            "key_id_nested": json.dumps(sig | {"key_id": {"a": [[{"b": 1}]]}}).encode(),
            "key_id_deep": b'{"alg": "ed25519", "signature": "AA==", "key_id": ' + b"[" * 20_000,
            "signature_not_base64": json.dumps(sig | {"signature": "!!!"}).encode(),
            "signature_wrong": json.dumps(sig | {"signature": "A" * 86 + "=="}).encode(),
            "signature_list": json.dumps(sig | {"signature": [1]}).encode(),
            "non_utf8": b"\xff\xfe\x00", "null": b"null", "string": b'"x"', "empty": b"",
            "open_brackets": b"[" * 20_000,
        },
        "profile": {
            "x86_cpu": profile, "rpi4": (ROOT / "targets" / "rpi4.toml").read_bytes(),
            "latency_inf": profile.replace(b"latency_budget_ms", b"latency_budget_ms = inf\n_x", 1),
            "non_utf8": b'id = "\xff\xfe"\n', "deep_array": b"a = " + b"[" * 20_000,
            "deep_table": b"a = " + b"{b = " * 20_000, "empty": b"", "threads_huge": b"threads = " + b"9" * 400,
        },
        "agent_config": {
            "pi_example": (ROOT / "examples" / "raspberry_pi" / "agent.toml").read_bytes(),
            "non_utf8": b'broker = "\xff"\n', "deep_array": b"trusted_keys = " + b"[" * 20_000,
            "threads_lots": b'threads = "lots"\n', "window_nan": b"window_s = nan\n", "window_inf": b"window_s = inf\n",
            "agent_table": b'[agent]\nbroker = "mqtt://x"\n', "typo": b'brokr = "mqtt://x"\n',
            "device_slash": b'device_id = "a/b"\n', "device_hash": b'device_id = "#"\n',
            "broker_http": b'broker = "http://x"\n', "state_dir_proc": b'state_dir = "/proc/self"\n',
        },
        "input_spec": {
            "size_one": b'{"size": [1]}', "scale_div0": b"scale=1/0", "scale_0div0": b"scale=0/0",
            "size_zero": b"size=0x0", "size_huge": b"size=99999999999x99999999999", "mean_nan": b"mean=nan,nan,nan",
            "layout_list": b'{"layout": []}', "deep": b"{" + b'"a":{' * 20_000,
            "ok": b"layout=NHWC;color=BGR;scale=1/255",
            "non_utf8": b"color=\xff\xfe", "size_text": b'{"size": ["a", "b"]}', "shape_key": b'{"shape": "x"}',
        },
        "broker": {
            "mqtt": b"mqtt://127.0.0.1:1883", "mqtts": b"mqtts://broker.example.lan:8883", "ws_path": b"ws://h:80/mqtt",
            "port_99999": b"mqtt://h:99999", "port_0": b"mqtt://h:0", "ipv6_bad": b"mqtt://[bad", "http": b"http://x",
            "empty": b"", "userinfo": b"user:p%zz@host", "no_host": b"mqtt://:1883", "non_utf8": b"mqtt://\xff\xfe",
        },
        "telemetry": {
            "valid": json.dumps(window).encode(), "deep": b"[" * 20_000, "nan_fps": json.dumps(
                window | {"fps": float("nan")}).encode(), "seq_huge": json.dumps(window | {"seq": 10 ** 400}).encode(),
            "non_utf8": b'{"boot_id": "\xff"}', "null": b"null", "latency_bad": json.dumps(
                window | {"latency_ms": {"x": [1]}}).encode(),
        },
    }


def main() -> None:
    for parser, files in seeds().items():
        d = CORPUS / parser
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
    print(f"wrote {sum(len(f) for f in seeds().values())} seeds under {CORPUS}")


if __name__ == "__main__":
    main()
