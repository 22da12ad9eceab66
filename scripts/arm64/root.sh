#!/usr/bin/env bash
# Build (once) and cache a Debian bookworm arm64 root that stands in for a Raspberry Pi 4 userland.
#
# Why a cached root: debootstrap of an emulated arm64 system takes minutes on a small host; it is
# built into a temporary directory and renamed only when complete, so an interrupted build never
# leaves a half root that later runs would trust. Source this file; `arm64_root` prints the path.
#
# Why these packages: python3 3.11 + venv is what Raspberry Pi OS bookworm ships; everything else the
# device needs comes from the kit's wheels, installed offline. procps gives `ps` to the checks.
set -euo pipefail

ARM64_CACHE=${ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lepton-edge}
ARM64_ROOT=${ARM64_ROOT:-$ARM64_CACHE/arm64-root}
ARM64_MIRROR=${ARM64_MIRROR:-http://deb.debian.org/debian}
ARM64_PACKAGES=python3,python3-venv,procps

arm64_host_tools() {
  # debootstrap, qemu-user-static (the aarch64 interpreter), binfmt-support (registers it with F)
  local missing=""
  for p in debootstrap qemu-user-static binfmt-support; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    # F (fix binary): the interpreter is opened now, so it works inside a chroot without a copy there
    echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
      > /proc/sys/fs/binfmt_misc/register
  fi
  grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || { echo "qemu-aarch64 is registered without the F flag: a chroot cannot find its interpreter" >&2; return 1; }
}

arm64_mounted_under() {
  # any mount point at or below $1 (never rm -rf a root with /proc or /dev mounted inside)
  awk -v r="$(readlink -f "$1")" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/mounts
}

arm64_build_root() {
  [ -x "$ARM64_ROOT/usr/bin/python3" ] && return 0
  mkdir -p "$ARM64_CACHE"
  local tmp="$ARM64_ROOT.tmp.$$"
  if [ -n "$(arm64_mounted_under "$tmp" 2>/dev/null)" ]; then echo "mounts under $tmp; not touching it" >&2; return 1; fi
  rm -rf "$tmp"
  echo "arm64: debootstrap bookworm into $ARM64_ROOT (first run only; several minutes)" >&2
  local t0=$SECONDS
  if ! debootstrap --arch=arm64 --variant=minbase --include="$ARM64_PACKAGES" bookworm "$tmp" "$ARM64_MIRROR" \
      > "$ARM64_CACHE/debootstrap.log" 2>&1; then
    echo "debootstrap failed; see $ARM64_CACHE/debootstrap.log" >&2
    if [ -z "$(arm64_mounted_under "$tmp")" ]; then rm -rf "$tmp"; fi
    return 1
  fi
  if [ -n "$(arm64_mounted_under "$tmp")" ]; then echo "debootstrap left mounts under $tmp" >&2; return 1; fi
  rm -rf "$tmp/var/cache/apt/archives/"*.deb
  mv "$tmp" "$ARM64_ROOT"
  echo "arm64: root built in $((SECONDS - t0)) s" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  arm64_host_tools
  arm64_build_root
  echo "$ARM64_ROOT"
fi
