#!/usr/bin/env bash
# The arm64 proof (`make test-arm64`): the rpi4 path, installed from an offline kit and run on a
# Debian bookworm arm64 userland under qemu-user (Cortex-A72 model, as a Raspberry Pi 4).
#
#   sudo scripts/arm64/run.sh        (as root on an x86_64 Debian/Ubuntu host; minutes once the root is cached)
#
# Env: ARM64_BUNDLE (an rpi4 TFLite bundle; default: export zoo:fashion-cnn), ARM64_ONNX_BUNDLE (an ONNX
# bundle for the ONNX kit; default: export zoo:fashion-cnn for x86-cpu; ARM64_ONNX=0 skips it),
# ARM64_OUT (results; default out/arm64), PY (the host's python with lepton-edge[all]); ARM64_PNG_FRAMES (200),
# ARM64_VIDEO_COMPARE (1; 0 skips the video comparison, e.g. for a large model whose emulated frames take
# seconds), ARM64_AGENT_FRAMES (1000) and ARM64_AGENT_TIMEOUT (600 s) size the steps.
#
# Steps: cached root -> a throwaway overlay on it -> kit built on the host -> `tar xf && ./install.sh`
# inside (twice: the second is an upgrade that must keep config and state) -> run on PNG frames (scores
# must equal x86's bit for bit) and an MJPG video (top-1 agreement >= 0.99) -> the agent against a
# mosquitto on the host (status, meta, two windows, ping, offline on SIGTERM) -> --uninstall.
#
# Facts this relies on (learned on such hosts): onnxruntime segfaults on import under qemu-user unless a
# Pi 4 style /proc/cpuinfo (aarch64 Features, CPU part 0xd08) is bind-mounted over the emulated one;
# QEMU_CPU=cortex-a72 makes ARMv8.2+ instructions trap as on a Pi 4; the chroot gets a clean environment
# (env -i); nothing is removed while /proc, /dev or /sys are mounted inside (checked against /proc/mounts).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
OUT=${ARM64_OUT:-$REPO/out/arm64}
[ "$(id -u)" = 0 ] || { echo "run.sh: needs root (debootstrap, mounts, chroot): sudo make test-arm64" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || { echo "run.sh: runs on an x86_64 host (it emulates arm64)" >&2; exit 2; }
# shellcheck source=root.sh
source "$HERE/root.sh"

step() { echo "== $* ($((SECONDS - T0)) s)" >&2; }
T0=$SECONDS
arm64_host_tools
arm64_build_root
ROOT_S=$((SECONDS - T0))
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/lepton-arm64.XXXXXX)
R=$WORK/root

cleanup() {
  set +e
  for m in $(arm64_mounted_under "$R" | sort -r); do umount "$m" 2>/dev/null || umount -l "$m"; done
  if [ -n "$(arm64_mounted_under "$R")" ]; then echo "run.sh: still mounted under $R; leaving $WORK" >&2; return; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # so a killed run still unmounts (the EXIT trap runs)

# a throwaway root: an overlay on the cached one (a copy where overlayfs is not allowed)
mkdir -p "$WORK/upper" "$WORK/ovl" "$R"
mount -t overlay overlay -o "lowerdir=$ARM64_ROOT,upperdir=$WORK/upper,workdir=$WORK/ovl" "$R" 2>/dev/null \
  || cp -a "$ARM64_ROOT/." "$R"
cat > "$WORK/cpuinfo" <<'EOF'
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

processor	: 1
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

Hardware	: BCM2835
Revision	: c03111
Model		: Raspberry Pi 4 Model B Rev 1.1
EOF
mount -t proc proc "$R/proc"
mount --bind "$WORK/cpuinfo" "$R/proc/cpuinfo"
mount --bind /dev "$R/dev"
mount -t sysfs -o ro sysfs "$R/sys"
CHROOT_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
            QEMU_CPU=cortex-a72 COLUMNS=200)
inroot() { "${CHROOT_ENV[@]}" chroot "$R" "$@"; }
inroot /usr/bin/python3 -c 'import platform, sys; assert platform.machine() == "aarch64"; print("arm64 root:", platform.machine(), sys.version.split()[0])' >&2

step "inputs (bundles, PNG frames, MJPG video)"
IN=$WORK/in
"$PY" "$HERE/inputs.py" make "$IN" ${ARM64_BUNDLE:+--bundle "$ARM64_BUNDLE"} --frames "${ARM64_PNG_FRAMES:-200}"
mkdir -p "$R/srv/arm64"
cp -r "$IN/frames" "$IN/video.avi" "$R/srv/arm64/"
chmod -R a+rX "$R/srv/arm64"
"$PY" -m lepton_edge.cli keys new -o "$WORK/keys" >/dev/null

step "kit (TFLite, rpi4)"
t=$SECONDS
"$PY" -m lepton_edge.kit_cli "$IN/bundle" --target rpi4 -o "$WORK/pi-kit.tar.gz" --key "$WORK/keys/private.pem" \
  --fleet arm64 --device-id pi-test --source /srv/arm64/video.avi --json > "$OUT/kit-tflite.json"
KIT_S=$((SECONDS - t))
cp "$WORK/pi-kit.tar.gz" "$R/root/"

step "install.sh in the arm64 root (offline)"
t=$SECONDS
inroot /bin/bash -c 'cd /root && tar xf pi-kit.tar.gz && ./pi-kit/install.sh' >&2
INSTALL_S=$((SECONDS - t))
[ -L "$R/opt/lepton-edge/venv" ] && [ -f "$R/etc/lepton-edge/agent.toml" ] && [ -f "$R/var/lib/lepton-edge/kit-bundle/manifest.json" ] \
  && [ -f "$R/etc/systemd/system/lepton-edge-agent.service" ] || { echo "run.sh: install.sh left an incomplete install" >&2; exit 1; }
VENV_MB=$(du -sm "$(readlink -f "$R/opt/lepton-edge/venv")" | cut -f1)  # not -L: a venv's lib64 links to lib
WHEELS_MB=$(du -sm "$R/root/pi-kit/wheels" | cut -f1)
if inroot /opt/lepton-edge/venv/bin/python -c 'import onnxruntime' 2>/dev/null; then echo "run.sh: onnxruntime in a TFLite kit" >&2; exit 1; fi

step "install.sh again: an upgrade keeps config and state"
echo "# edited by the operator" >> "$R/etc/lepton-edge/agent.toml"
echo keep > "$R/var/lib/lepton-edge/marker"
t=$SECONDS
inroot /bin/bash -c 'cd /root/pi-kit && ./install.sh' >&2
UPGRADE_S=$((SECONDS - t))
grep -q "edited by the operator" "$R/etc/lepton-edge/agent.toml" && [ -f "$R/var/lib/lepton-edge/marker" ] \
  || { echo "run.sh: the upgrade lost config or state" >&2; exit 1; }
[ "$(ls -d "$R"/opt/lepton-edge/venv-* | wc -l)" = 1 ] || { echo "run.sh: old venvs left behind" >&2; exit 1; }

step "inspect, run on PNG frames and on the video: arm64 vs x86"
LE=/opt/lepton-edge/venv/bin/lepton-edge
B=/var/lib/lepton-edge/kit-bundle
inroot $LE inspect $B > "$OUT/inspect.txt"
t=$SECONDS
inroot $LE run $B --source /srv/arm64/frames --jsonl /srv/arm64/frames.jsonl --no-show --every 0 > /dev/null
VIDEO_COMPARE=${ARM64_VIDEO_COMPARE:-1}
[ "$VIDEO_COMPARE" = 0 ] || inroot $LE run $B --source /srv/arm64/video.avi --jsonl /srv/arm64/video.jsonl --no-show --every 0 > /dev/null
RUN_S=$((SECONDS - t))
"$PY" -m lepton_edge.cli run "$IN/bundle" --source "$IN/frames" --jsonl "$WORK/frames-x86.jsonl" --no-show --every 0 > /dev/null
"$PY" "$HERE/inputs.py" compare "$R/srv/arm64/frames.jsonl" "$WORK/frames-x86.jsonl" --exact > "$OUT/compare-frames.json" \
  || { echo "run.sh: PNG frames: arm64 scores differ from x86: $(cat "$OUT/compare-frames.json")" >&2; exit 1; }
if [ "$VIDEO_COMPARE" = 0 ]; then echo '{"skipped": "ARM64_VIDEO_COMPARE=0"}' > "$OUT/compare-video.json"; else
  "$PY" -m lepton_edge.cli run "$IN/bundle" --source "$IN/video.avi" --jsonl "$WORK/video-x86.jsonl" --no-show --every 0 > /dev/null
  "$PY" "$HERE/inputs.py" compare "$R/srv/arm64/video.jsonl" "$WORK/video-x86.jsonl" --min-top1 0.99 > "$OUT/compare-video.json" \
    || { echo "run.sh: video: top-1 agreement below 0.99: $(cat "$OUT/compare-video.json")" >&2; exit 1; }
fi

step "the agent in the arm64 root against a mosquitto on the host"
"$PY" "$HERE/agent_check.py" --fleet arm64 --device pi-test --frames "${ARM64_AGENT_FRAMES:-1000}" --timeout "${ARM64_AGENT_TIMEOUT:-600}" -- \
  "${CHROOT_ENV[@]}" chroot --userspec=lepton-edge:lepton-edge "$R" $LE agent --config /etc/lepton-edge/agent.toml \
  --broker '{broker}' --loop --window 2 > "$OUT/agent-emulated.json" \
  || { echo "run.sh: agent check failed: $(cat "$OUT/agent-emulated.json")" >&2; exit 1; }

step "install.sh --uninstall"
inroot /bin/bash -c 'cd /root/pi-kit && ./install.sh --uninstall' >&2
for p in opt/lepton-edge etc/lepton-edge var/lib/lepton-edge etc/systemd/system/lepton-edge-agent.service; do
  [ ! -e "$R/$p" ] || { echo "run.sh: --uninstall left /$p" >&2; exit 1; }
done
! inroot id lepton-edge >/dev/null 2>&1 || { echo "run.sh: --uninstall left the user" >&2; exit 1; }

ONNX_JSON=null
if [ "${ARM64_ONNX:-1}" = 1 ]; then
  step "kit (ONNX, generic-arm64): install, run on the frames"
  if [ -n "${ARM64_ONNX_BUNDLE:-}" ]; then OB=$ARM64_ONNX_BUNDLE; else
    OB=$("$PY" -c 'import lepton_edge, sys; print(lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", out=sys.argv[1], eval_limit=1000).bundle.path)' "$WORK/onnx-export" | tail -1)
  fi
  "$PY" -m lepton_edge.kit_cli "$OB" --target generic-arm64 -o "$WORK/onnx-kit.tar.gz" --json > "$OUT/kit-onnx.json"
  cp "$WORK/onnx-kit.tar.gz" "$R/root/"
  inroot /bin/bash -c 'cd /root && tar xf onnx-kit.tar.gz && ./onnx-kit/install.sh' >&2
  ONNX_VENV_MB=$(du -sm "$(readlink -f "$R/opt/lepton-edge/venv")" | cut -f1)  # not -L: a venv's lib64 links to lib
  ONNX_WHEELS_MB=$(du -sm "$R/root/onnx-kit/wheels" | cut -f1)
  # issue 12 point 4: an ONNX bundle inspected on a device with only the device extra (no `onnx` package)
  ! inroot /opt/lepton-edge/venv/bin/python -c 'import onnx' 2>/dev/null \
    || { echo "run.sh: the ONNX kit installed the onnx package" >&2; exit 1; }
  inroot $LE inspect $B --json > "$OUT/inspect-onnx.json"
  inroot $LE run $B --source /srv/arm64/frames --jsonl /srv/arm64/onnx.jsonl --no-show --every 0 > /dev/null
  "$PY" -m lepton_edge.cli run "$OB" --source "$IN/frames" --jsonl "$WORK/onnx-x86.jsonl" --no-show --every 0 > /dev/null
  "$PY" "$HERE/inputs.py" compare "$R/srv/arm64/onnx.jsonl" "$WORK/onnx-x86.jsonl" --min-top1 0.99 > "$OUT/compare-onnx.json" \
    || { echo "run.sh: ONNX on arm64: top-1 agreement below 0.99: $(cat "$OUT/compare-onnx.json")" >&2; exit 1; }
  ONNX_JSON="{\"wheels_mb\": $ONNX_WHEELS_MB, \"installed_mb\": $ONNX_VENV_MB, \"frames\": $(cat "$OUT/compare-onnx.json")}"
fi

MODEL=$("$PY" -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["name"], m["precision"], m["format"])' "$IN/bundle/manifest.json")
cat > "$OUT/result.json" <<EOF
{"ok": true, "model": "$MODEL", "agent_frames": ${ARM64_AGENT_FRAMES:-1000}, "root_build_s": $ROOT_S, "kit_build_s": $KIT_S, "install_s": $INSTALL_S, "upgrade_s": $UPGRADE_S,
 "run_frames_and_video_s": $RUN_S, "total_s": $((SECONDS - T0)),
 "tflite": {"wheels_mb": $WHEELS_MB, "installed_mb": $VENV_MB, "frames": $(cat "$OUT/compare-frames.json"),
            "video": $(cat "$OUT/compare-video.json"), "agent": $(cat "$OUT/agent-emulated.json")},
 "onnx": $ONNX_JSON,
 "note": "emulated (qemu-user, cortex-a72): the timings are not speed figures"}
EOF
cat "$OUT/result.json"
step "arm64 proof passed"
