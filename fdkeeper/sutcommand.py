"""`fdkeeper sut`: the embedded SuT (fdkeeper.testbed's Kamailio) in the foreground, to try
fdkeeper against: UDP and TCP on one port, TLS on another with a throw-away test PKI written
to a folder it names, SIP over WebSocket (WS) and secure WebSocket (WSS) on two more, on given
or free loopback ports. It prints the addresses, the domain
and commands ready to paste, then runs until Ctrl-C, SIGTERM or SIGHUP, and stops Kamailio.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from fdkeeper import testbed
from fdkeeper.errors import FdkeeperError
from fdkeeper.testbed.process import missing_websocket_module

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POLL = 0.5  # seconds between checks that Kamailio still runs
ANSWER_PORT = 5070  # the answering run's -p in the printed commands (the README's)
USERS_CSV = "users.csv"  # shipped next to the scenarios: alice, bob, carol in fdkeeper's test domain


def serve(
    port: int | None,
    tls_port: int | None,
    pki_dir: Path | None,
    say: Callable[[str], None] = print,
    *,
    ws_port: int | None = None,
    wss_port: int | None = None,
) -> signal.Signals:
    """Run the SuT until a stop signal; return the signal. FdkeeperError when it cannot start
    or dies on its own."""
    workdir = Path(tempfile.mkdtemp(prefix="fdks-"))  # short: Kamailio's control socket path
    try:
        pki = testbed.make_test_pki(pki_dir or workdir / "pki")
        no_websocket = missing_websocket_module()
        kamailio = testbed.Kamailio(
            workdir / "kamailio",
            port=port,
            tls=testbed.KamailioTls.server(pki),
            tls_port=tls_port,
            websocket=no_websocket is None,
            ws_port=ws_port,
            wss_port=wss_port,
        )
        with _stop_signals() as stopped:
            _start(kamailio)
            try:
                say(describe(kamailio, pki, no_websocket))
                return _wait(kamailio, stopped)
            finally:
                kamailio.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def describe(kamailio: testbed.Kamailio, pki: testbed.TestPki, no_websocket: str | None = None) -> str:
    """What runs where, and commands to paste (from the current directory); `no_websocket`: why
    there are no WebSocket listeners."""
    scenarios = _shown(testbed.SCENARIOS_DIR)
    sut, tls_sut, ws_sut, wss_sut = kamailio.address, kamailio.tls_address, kamailio.ws_address, kamailio.wss_address
    tls = f"--tls-ca {_shown(pki.ca_cert)} --tls-sni {pki.server_name}"
    register = f"-sf {scenarios}/uac-register.xml -inf {scenarios}/{USERS_CSV}"
    lines = [
        f"fdkeeper sut: Kamailio for domain {kamailio.domain} (users alice, bob, carol: {scenarios}/{USERS_CSV})",
        f"  UDP and TCP  {sut}",
        f"  TLS          {tls_sut}  (test CA {_shown(pki.ca_cert)}, certificate for {pki.server_name})",
        *_websocket_lines(ws_sut, wss_sut, no_websocket),
        f"  log          {kamailio.log_path}",
        "",
        "Try it (in another terminal):",
        f"  fdkeeper sipp -sf {scenarios}/uac-register.xml -inf {scenarios}/{USERS_CSV} -t t1 -i 127.0.0.1 -m 1 {sut}",
        f"  fdkeeper sipp -sf {scenarios}/uas-answer.xml -t t1 -i 127.0.0.1 -p {ANSWER_PORT} -m 1 {sut} &",
        f"  sipp -sf {scenarios}/uac-call.xml -s alice -key domain {kamailio.domain} -t u1 -m 1 -nostdin {sut}",
        "  wait; fdkeeper status; fdkeeper stop",
        "Over TLS:",
        f"  fdkeeper sipp {tls} {register} -t l1 -i 127.0.0.1 -m 1 {tls_sut}",
        *(
            []
            if no_websocket
            else [
                "Over WebSocket (WS: -t t1, WSS: -t l1; -t tn/ln: one WebSocket per user):",
                f"  fdkeeper sipp --ws {register} -t t1 -i 127.0.0.1 -m 1 {ws_sut}",
                f"  fdkeeper sipp --ws {tls} {register} -t l1 -i 127.0.0.1 -m 1 {wss_sut}",
            ]
        ),
        "",
        "Ctrl-C stops it.",
    ]
    return "\n".join(lines)


def _websocket_lines(ws_sut: str | None, wss_sut: str | None, no_websocket: str | None) -> list[str]:
    if no_websocket:
        return [f"  WS, WSS      none: {no_websocket}"]
    return [
        f"  WS           ws://{ws_sut}/  (SIP over WebSocket, subprotocol sip)",
        f"  WSS          wss://{wss_sut}/  (the same over TLS, same certificate)",
    ]


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is under it (shorter to paste), else absolute."""
    real, here = Path(os.path.realpath(path)), Path.cwd().resolve()
    return os.path.relpath(real, here) if real.is_relative_to(here) else str(real)


def _start(kamailio: testbed.Kamailio) -> None:
    try:
        kamailio.start()
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise FdkeeperError(
            f"fdkeeper sut: Kamailio did not start: {first}; try other ports (--port, --tls-port, --ws-port, --wss-port)"
        ) from None


def _wait(kamailio: testbed.Kamailio, stopped: _Stopped) -> signal.Signals:
    while not stopped.event.wait(POLL):
        if not kamailio.running:
            raise FdkeeperError(f"fdkeeper sut: Kamailio ended on its own; its log: {kamailio.log_path}")
    assert stopped.signal is not None  # set with the event
    return stopped.signal


class _Stopped:
    """Which stop signal arrived (the handlers set it; the main loop waits on the event)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: signal.Signals | None = None

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum)
        self.event.set()


@contextmanager
def _stop_signals() -> Iterator[_Stopped]:
    """SIGINT, SIGTERM and SIGHUP end the wait (not the program halfway through a start or stop)."""
    stopped = _Stopped()
    previous = {signum: signal.signal(signum, stopped.handle) for signum in STOP_SIGNALS}
    try:
        yield stopped
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
