"""Which int8 dot-product instructions this CPU has, as one word: recorded in a bundle's manifest by the export
(`toolchain.cpu_int8`) and compared by `lepton-edge bench` on the device.

Why: onnxruntime picks its int8 kernels by instruction set, and they do not all compute the same sums. On
x86 without VNNI (AVX2, AVX-512 without VNNI), uint8 x int8 products are added in int16 pairs that saturate
past 32,767; with VNNI they are not. An int8 graph validated on a VNNI workstation can therefore give other
answers on an AVX2 device (measured on an AVX2-only AMD EPYC: ddddocr's detector matched 0.727 of fp32's
boxes with 8-bit weights, 0.907 with 7-bit ones). x86-cpu's onnxruntime u8 recipes keep 7-bit weights for that
(compress/quantize.Recipe `-w7`); NNCF's graphs and the s8 recipes do not, so a device whose kernels differ
from the exporting host's is told so. Read from /proc/cpuinfo (Linux), so it costs no import.
"""
from __future__ import annotations

import platform
from pathlib import Path

# x86: from the most capable down (the first present names the CPU); ARM: the dot-product extension
_X86 = (("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"), ("avx2", "avx2"))
WORDS = frozenset({"avx512-vnni", "avx-vnni", "avx2", "sse", "neon-dotprod", "neon"})  # what cpu_int8 says


def cpu_int8(cpuinfo: str | None = None) -> str | None:
    """`avx512-vnni`, `avx-vnni`, `avx2` (AVX2 or AVX-512 without VNNI: the kernels that add u8 x s8 products in
    int16 pairs) or `sse` on x86-64; `neon-dotprod` or `neon` on ARM64; None where it cannot be read (another
    OS or architecture). `cpuinfo`: /proc/cpuinfo's text (read here when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")[:1 << 20]
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
            break  # (every core lists the same)
    if not flags:
        return None
    machine = platform.machine().lower()
    if "asimd" in flags or machine in ("aarch64", "arm64"):
        return "neon-dotprod" if "asimddp" in flags else "neon"
    if machine not in ("x86_64", "amd64", "i386", "i686") and "sse2" not in flags:
        return None  # (another architecture: no word for it)
    for flag, word in _X86:
        if flag in flags:
            return word
    return "sse"


def kernels_differ(exported_on: str | None, here: str | None) -> str | None:
    """A line when an int8 graph validated where int8 is computed exactly (an x86 CPU with VNNI or SSE only, an
    ARM one) runs here on an x86 CPU with AVX2 and no VNNI, whose onnxruntime kernels saturate on 8-bit
    weights: the validation did not see that (bench leaves out 7-bit `-w7` graphs, which cannot saturate).
    None otherwise: validated on kernels that saturate too, it was judged as it runs here or worse; an
    unknown side says nothing."""
    saturating = {"avx2"}  # (onnxruntime's SSE kernel widens to int16 and adds pairs in int32: exact)
    if exported_on not in WORDS or here not in saturating or exported_on in saturating:
        return None  # (a manifest's own value that is none of ours, 5 KB of escapes, is never printed)
    return (f"this int8 bundle was validated on a CPU with {exported_on} and runs here on {here}: onnxruntime's "
            "int8 kernels differ (without VNNI they saturate on 8-bit weights): export it on a CPU of this kind, "
            "or with 7-bit weights (--recipes u8-minmax-w7,u8-percentile-w7)")
