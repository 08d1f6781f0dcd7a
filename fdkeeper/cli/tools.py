"""The commands around the runs: `fdkeeper demo`, `fdkeeper sut` (the embedded SuT in the
foreground) and `fdkeeper doctor`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from fdkeeper.cli.group import main


@main.command("demo")
@click.option(
    "--sipp", "sipp_path", metavar="PATH", envvar="FDKEEPER_SIPP", help="sipp binary (default: sipp on PATH)."
)
@click.option(
    "--keep-files", is_flag=True, help="Keep the demo's work directory (configs, logs) and print where it is."
)
@click.option(
    "--auth", is_flag=True, help="The SuT wants digest credentials: REGISTER is challenged (401), the call too (407)."
)
@click.option("--ws", "websocket", is_flag=True, help="Tell it over secure WebSocket (WSS), as a WebRTC client would.")
def demo_command(sipp_path: str | None, keep_files: bool, auth: bool, websocket: bool) -> None:
    """Register over TCP in one sipp run, answer a call in a second run, against a local Kamailio.

    Starts Kamailio on a free loopback port with its own configuration (the embedded
    default SuT), its own keeper, and prints every step and the result. With --ws the
    story is a WebRTC client's over secure WebSocket: the call comes between the runs.
    """
    from fdkeeper.demo import run_demo

    started = time.monotonic()
    ok = run_demo(sipp=sipp_path, keep_files=keep_files, say=click.echo, auth=auth, websocket=websocket)
    click.echo(f"demo {'PASSED' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    sys.exit(0 if ok else 1)


@main.command("sut")
@click.option("--port", type=click.IntRange(1, 65535), metavar="PORT", help="UDP and TCP port (default: a free one).")
@click.option("--tls-port", type=click.IntRange(1, 65535), metavar="PORT", help="TLS port (default: a free one).")
@click.option("--ws-port", type=click.IntRange(1, 65535), metavar="PORT", help="WebSocket port (default: a free one).")
@click.option(
    "--wss-port", type=click.IntRange(1, 65535), metavar="PORT", help="Secure WebSocket port (default: free)."
)
@click.option(
    "--pki",
    "pki_dir",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Write the test PKI (ca.crt for --tls-ca) here (default: a temporary folder, removed at the end).",
)
def sut_command(
    port: int | None, tls_port: int | None, ws_port: int | None, wss_port: int | None, pki_dir: Path | None
) -> None:
    """Run the embedded SuT (a local Kamailio: TCP, TLS, WS, WSS) in the foreground, to try fdkeeper against.

    Prints its addresses, domain, test CA and commands to paste; Ctrl-C (or SIGTERM) stops it.
    """
    from fdkeeper.sutcommand import serve

    stopped_by = serve(port, tls_port, pki_dir, say=click.echo, ws_port=ws_port, wss_port=wss_port)
    click.echo(f"fdkeeper sut: stopped ({stopped_by.name})")


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="The checks as JSON, for scripts.")
def doctor_command(as_json: bool) -> None:
    """Say what this machine lacks for fdkeeper, and the one command that installs each.

    Exit status 0 when all the basic path needs (sipp, the shim, Kamailio for the embedded
    SuT, the open-file limit) is here, 1 otherwise.
    """
    from fdkeeper.doctor import doctor

    sys.exit(doctor(as_json, say=click.echo))
