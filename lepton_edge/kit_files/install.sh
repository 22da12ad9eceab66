#!/bin/bash
# lepton-edge offline install kit "@KIT_NAME@": installs the agent, its bundle and its service, no network.
#
#   sudo ./install.sh              install, or upgrade in place (config and state are kept)
#   sudo ./install.sh --uninstall  remove the service, the venv, the config and the state
#   ./install.sh --check           only check the kit (checksums, architecture, Python); changes nothing
#
# Why checks come first: every refusal (a changed file, the wrong board, the wrong Python) happens
# before anything on the system is touched, in one line. Why a versioned venv behind a symlink: an
# upgrade builds the new venv beside the old one and swaps a symlink, so a failed upgrade leaves
# the running agent's software as it was.
# LEPTON_EDGE_ROOT (tests only) prefixes every system path.
set -euo pipefail
umask 022
export LC_ALL=C

KIT_ARCH=@KIT_ARCH@
KIT_PYTHON=@KIT_PYTHON@
KIT_WHEEL=@KIT_WHEEL@
R=${LEPTON_EDGE_ROOT:-}
PREFIX=$R/opt/lepton-edge
ETC=$R/etc/lepton-edge
STATE=$R/var/lib/lepton-edge
UNIT=$R/etc/systemd/system/lepton-edge-agent.service
SVC_USER=lepton-edge
KIT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "install.sh: $*" >&2; exit 1; }
have_systemd() { [ -z "$R" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

check_kit() {
  cd "$KIT"
  [ -f SHA256SUMS ] || die "no SHA256SUMS in $KIT: not a complete kit; refusing to install"
  # first, as sha256sum would follow a link or block on a FIFO: a kit holds files and folders only. A link
  # is not `-type f`, so a wheel linked into wheels/ (a hostile archive's member) passed the check below
  local odd
  odd=$(find . ! -type f ! -type d -print -quit 2>/dev/null) || die "cannot read every file of $KIT; refusing to install"
  [ -z "$odd" ] || die "${odd#./} is not a regular file (a link?): the kit was changed; refusing to install"
  if ! sha256sum --quiet --strict -c SHA256SUMS >/dev/null 2>&1; then
    die "checksum mismatch in $KIT ($(sha256sum --quiet -c SHA256SUMS 2>/dev/null | head -1 | cut -d: -f1)): the kit was changed or damaged; refusing to install"
  fi
  # a file the list does not name (a wheel slipped into wheels/) would be installed too: refuse it
  local extra
  extra=$(find . -type f ! -name SHA256SUMS | sed 's|^\./||' | sort | comm -23 - <(sed 's/^[0-9a-f]*  //' SHA256SUMS | sort) | head -1)
  [ -z "$extra" ] || die "file $extra is not in SHA256SUMS: the kit was changed; refusing to install"
  local arch py
  arch=$(uname -m)
  [ "$arch" = "$KIT_ARCH" ] || die "this kit is for $KIT_ARCH, this machine is $arch; build a kit for its target (lepton-edge kit --target ...); nothing was changed"
  command -v python3 >/dev/null || die "python3 not found; this kit needs Python $KIT_PYTHON; nothing was changed"
  py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$py" = "$KIT_PYTHON" ] || die "this kit is for Python $KIT_PYTHON, this machine has Python $py; build a kit with --python $py; nothing was changed"
  python3 -c 'import venv, ensurepip' 2>/dev/null || die "Python's venv module is missing (sudo apt install python3-venv); nothing was changed"
}

uninstall() {
  [ "$(id -u)" = 0 ] || die "run as root (sudo ./install.sh --uninstall)"
  if have_systemd; then
    systemctl disable --now lepton-edge-agent >/dev/null 2>&1 || true
  else
    pkill -TERM -u "$SVC_USER" -f "lepton-edge agent" 2>/dev/null || true
  fi
  rm -f "$UNIT"
  have_systemd && systemctl daemon-reload || true
  rm -rf "$PREFIX" "$ETC" "$STATE"
  if [ -z "$R" ] && id "$SVC_USER" >/dev/null 2>&1; then userdel "$SVC_USER" 2>/dev/null || true; fi
  echo "lepton-edge removed (service, $PREFIX, $ETC, $STATE, user $SVC_USER)"
}

install_kit() {
  [ "$(id -u)" = 0 ] || die "run as root: sudo $0"
  # (globals, not locals: the EXIT trap runs after this function has returned, and `set -u` would
  # stop it at the first unset name, leaving the half-built venv behind)
  VENV_NEW="$PREFIX/venv-$(date +%Y%m%d%H%M%S)-$$"
  STAGED=()
  cleanup() { local rc=$?; if [ $rc != 0 ]; then rm -rf "$VENV_NEW" ${STAGED[@]+"${STAGED[@]}"}; echo "install.sh: failed; the previous install (if any) is unchanged" >&2; fi; }
  trap cleanup EXIT
  local venv_new=$VENV_NEW

  # the service user: no login, no home of its own beyond the state directory
  if [ -z "$R" ] && ! id "$SVC_USER" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/lepton-edge --no-create-home --shell /usr/sbin/nologin "$SVC_USER"
  fi
  if [ -z "$R" ] && getent group video >/dev/null; then usermod -aG video "$SVC_USER"; fi
  local grp=$SVC_USER; [ -z "$R" ] || grp=$(id -gn)

  echo "installing the Python packages (offline, from wheels/)..."
  mkdir -p "$PREFIX"
  python3 -m venv "$venv_new"
  "$venv_new/bin/python" -m pip install -q --no-index --no-cache-dir --disable-pip-version-check \
    --find-links "$KIT/wheels" -r "$KIT/requirements.txt" "$KIT/wheels/$KIT_WHEEL"
  "$venv_new/bin/lepton-edge" --help >/dev/null || die "the new venv does not run lepton-edge"
  # the device never installs into this venv again (an upgrade builds a new one): pip, setuptools and
  # numpy's own test suite are 50 MB of the footprint budget
  "$venv_new/bin/python" -m pip uninstall -q -y pip setuptools >/dev/null 2>&1 || true
  find "$venv_new"/lib/python3*/site-packages/numpy -type d -name tests -prune -exec rm -rf {} + 2>/dev/null || true
  # an upgrade keeps agent.toml: it must take this kit's bundle (signed by a key it trusts), checked by the
  # new venv's own lepton_edge before anything on the system changes (lepton_edge/kit_upgrade.py)
  if [ -f "$ETC/agent.toml" ]; then
    "$venv_new/bin/python" -m lepton_edge.kit_upgrade "$ETC/agent.toml" "$KIT/bundle" "$KIT/trusted" "$R" || exit 1
  fi

  # config: kept when present (an upgrade never overwrites what the operator edited)
  install -d -m 0750 -o root -g "$grp" "$ETC"
  if [ -f "$ETC/agent.toml" ]; then
    install -m 0640 -o root -g "$grp" "$KIT/agent.toml" "$ETC/agent.toml.kit-new"
    echo "kept $ETC/agent.toml (this kit's version is beside it: agent.toml.kit-new)"
  else
    install -m 0640 -o root -g "$grp" "$KIT/agent.toml" "$ETC/agent.toml"
  fi
  if [ -d "$KIT/tls" ]; then
    install -d -m 0750 -o root -g "$grp" "$ETC/tls"
    for f in "$KIT"/tls/*; do
      t="$ETC/tls/$(basename "$f")"
      if [ ! -e "$t" ]; then
        install -m 0640 -o root -g "$grp" "$f" "$t"
      elif ! cmp -s "$f" "$t"; then  # kept, as agent.toml is; the kit's is beside it
        install -m 0640 -o root -g "$grp" "$f" "$t.kit-new"
        echo "kept $t (this kit's differs: $(basename "$t").kit-new beside it)"
      fi
    done
  fi
  # state: the kit's bundle staged beside the running one (the outbox and deployed bundles stay)
  install -d -m 0750 -o "$SVC_USER" -g "$grp" "$STATE" 2>/dev/null || install -d -m 0750 "$STATE"
  rm -rf "$STATE/kit-bundle.new"
  STAGED+=("$STATE/kit-bundle.new")
  cp -r "$KIT/bundle" "$STATE/kit-bundle.new"
  [ -n "$R" ] || chown -R "$SVC_USER:$SVC_USER" "$STATE/kit-bundle.new"

  # the switch: the venv symlink, then the bundle. From the venv's swap on, the new install is the one
  # running, so the failure trap (which removes what this run built) is off before it
  ln -sfn "$(basename "$venv_new")" "$PREFIX/venv.new"
  trap - EXIT
  if ! mv -T "$PREFIX/venv.new" "$PREFIX/venv" 2>/dev/null; then
    rm -rf "$PREFIX/venv.new" "$venv_new" "${STAGED[@]}"
    die "cannot switch $PREFIX/venv to the new venv (is it a folder, not a link?); the previous install is unchanged"
  fi
  # the kit's trusted keys only now, beside the bundle they verify: written before the switch, a failed
  # or interrupted upgrade left the old bundle (and every deployed one) under a key that had replaced
  # theirs, and the agent refused them all at its next start
  # (after `trap - EXIT`: a failure here says what state it leaves, as no cleanup runs)
  if [ -d "$KIT/trusted" ] && compgen -G "$KIT/trusted/*" >/dev/null; then
    { install -d -m 0755 "$ETC/trusted" && install -m 0644 "$KIT"/trusted/* "$ETC/trusted/"; } \
      || die "cannot write the kit's trusted keys to $ETC/trusted: the new venv is in place with the previous bundle; free space and run install.sh again"
  fi
  rm -rf "$STATE/kit-bundle.old"
  [ ! -e "$STATE/kit-bundle" ] || mv "$STATE/kit-bundle" "$STATE/kit-bundle.old"
  mv "$STATE/kit-bundle.new" "$STATE/kit-bundle"
  rm -rf "$STATE/kit-bundle.old" || true
  for old in "$PREFIX"/venv-*; do [ "$old" = "$venv_new" ] || rm -rf "$old" || true; done

  install -d "$(dirname "$UNIT")"
  install -m 0644 "$KIT/lepton-edge-agent.service" "$UNIT"
  echo "installed: $PREFIX/venv ($(du -sm "$venv_new" | cut -f1) MB), $ETC/agent.toml, bundle in $STATE/kit-bundle"
  if have_systemd; then
    systemctl daemon-reload
    systemctl enable lepton-edge-agent >/dev/null 2>&1
    systemctl restart lepton-edge-agent
    echo "the agent is running; watch it with:"
    echo "  systemctl status lepton-edge-agent"
    echo "  journalctl -u lepton-edge-agent -f"
  else
    echo "systemd is not running here: start the agent with"
    echo "  sudo -u $SVC_USER $PREFIX/venv/bin/lepton-edge agent --config $ETC/agent.toml"
  fi
}

case "${1:-}" in
  --uninstall) uninstall ;;
  --check) check_kit; echo "kit OK for $KIT_ARCH, Python $KIT_PYTHON" ;;
  "") check_kit; install_kit ;;
  *) die "unknown option $1 (use --uninstall or --check)" ;;
esac
