"""`lepton-edge kit`: the command function; cli.py registers it (`app.command("kit")(kit)`).

Kept apart from cli.py so the verb can be run alone while developing: `python -m lepton_edge.kit_cli`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape


def kit(
    bundle: Path = typer.Argument(..., help="The bundle directory the device will run."),
    target: str | None = typer.Option(None, "--target", "-t", help="Profile id or .toml (default: the bundle's)."),
    output: Path = typer.Option(..., "--out", "-o", help="The kit archive to write, e.g. pi-kit.tar.gz."),
    key: Path | None = typer.Option(None, "--key", "-k", help="private.pem: sign the bundle; a fresh install "
                                       "then trusts only this key's bundles (an upgrade keeps the device's "
                                       "agent.toml: install.sh refuses a kit it would not run, and warns when "
                                       "it trusts no key)."),
    broker: str = typer.Option("mqtt://localhost:1883", help="The broker the agent reports to."),
    fleet: str = typer.Option("default", help="Fleet name (a topic segment)."),
    device_id: str | None = typer.Option(None, help="Device id (default: the device's hostname or machine id)."),
    source: str = typer.Option("0", "--source", "-s", help="Frame source on the device (camera index, URL...)."),
    ca_file: Path | None = typer.Option(None, help="CA certificate for TLS (copied into the kit)."),
    cert_file: Path | None = typer.Option(None, help="The device's client certificate (copied into the kit)."),
    key_file: Path | None = typer.Option(None, help="The device's client key (copied into the kit)."),
    glibc: str | None = typer.Option(None, help="The device's glibc, e.g. 2.36 (default: the target's OS)."),
    python: str | None = typer.Option(None, help="The device's Python, e.g. 3.11 (default: the target's OS)."),
    as_json: bool = typer.Option(False, "--json", help="Print the kit report as JSON on stdout."),
):
    """One offline install kit for a device: the bundle, the wheels of exactly its runtime for the
    target's platform, install.sh, the systemd unit and an agent.toml from these flags."""
    import signal

    from lepton_edge import kit as kitlib, ui

    def _stop(*_):  # SIGTERM as Ctrl-C: the kit's work folder (100+ MB of wheels) beside -o is removed
        raise KeyboardInterrupt  # (killed outright, a `.kit-*` folder stayed there)

    signal.signal(signal.SIGTERM, _stop)
    settings = kitlib.AgentSettings(broker=broker, fleet=fleet, device_id=device_id, source=source,
                                    ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    # (-o where nothing can be written, a disk that fills: kit.build's one line, tests/test_cli_surface.py)
    rep = kitlib.build(bundle, output, target=target, key=key, settings=settings, glibc=glibc, python=python)
    if as_json:
        ui.emit_json(rep.as_dict())
    else:
        ui.console().print(kitlib.summary(rep), end="", soft_wrap=True, highlight=False, markup=False)


def main() -> None:
    from lepton_edge import ui
    from lepton_edge.errors import LeptonError

    app = typer.Typer(add_completion=False)
    app.command()(kit)
    try:
        app()
    except LeptonError as e:
        ui.err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
