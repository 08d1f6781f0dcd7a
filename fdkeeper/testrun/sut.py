"""The SuT of a test: started for it and stopped after it, or the address it names.

Three kinds (fdkeeper.testrun.sutspec says what a test file writes):
- embedded: fdkeeper.testbed's Kamailio on free loopback ports, with a TLS listener and a
  throw-away PKI (fdkeeper.testbed.make_test_pki) for `transport: tls`, a WebSocket one for
  `ws`, both and a secure WebSocket one for `wss` (testrun.transport), and digest auth
  for the users of a CSV with `auth: true`; its log is copied into the test's log folder;
- started: Kamailio with the test's own configuration, or any command, in its own process
  group, ready once its TCP listeners accept (or `ready` says so), within `timeout`
  seconds; its output is written to the test's log folder (kamailio.log, sut.log);
- an address: nothing to start.
Work files live in a short temporary directory (unix socket paths are limited to 108 bytes).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fdkeeper import testbed
from fdkeeper.address import format_address, split_host_port
from fdkeeper.process import last_line
from fdkeeper.testbed.net import tail
from fdkeeper.testbed.process import find_program, stop_process
from fdkeeper.testbed.sipmsg import udp_options
from fdkeeper.testrun import interrupt, variables
from fdkeeper.testrun.sutspec import AddressSut, EmbeddedSut, StartedSut, SutSpec
from fdkeeper.testrun.transport import has_tls, has_websocket

# A listen line of a Kamailio configuration: listen=[PROTO:]HOST:PORT (an IPv6 HOST in []).
_LISTEN = re.compile(r"^\s*listen\s*=\s*(?:(udp|tcp|tls|sctp|ws|wss):)?(\[[^\]]+\]|[^\s:\[]+):(\d+)", re.MULTILINE)
_PROBE_INTERVAL = 0.05


class SutError(RuntimeError):
    """A started SuT that could not start or did not become ready; its one line says why
    (the test's result: "could not run: ...")."""


class _PortTaken(SutError):
    """The SuT exited as a port it was given was taken between the pick and its bind."""


# A free port can be taken by someone else before the SuT binds it: then start it again on
# new ones (strerror(EADDRINUSE) in its output says so), this many times in all.
_ATTEMPTS = 3
_ADDRESS_IN_USE = "Address already in use"


@dataclass(frozen=True)
class _Probe:
    """One readiness condition: `check()` is True once it holds; `what` names it for errors."""

    what: str
    check: Callable[[], bool]


@contextlib.contextmanager
def sut_variables(sut: SutSpec | None, transport: str, workdir: Path, logs: Path) -> Iterator[dict[str, str]]:
    """Yield the SuT's variables (sut, sut_host, sut_port, domain; sut_tls, tls_ca, tls_sni
    with TLS; sut_ws, sut_wss with WebSocket), starting and finally stopping a SuT the test
    has started for it."""
    if sut is None:
        yield {}
    elif isinstance(sut, AddressSut):
        yield _address_values(sut.address, sut.domain)
    elif isinstance(sut, StartedSut):
        with started_sut(sut, workdir / "sut", logs) as address:
            yield _address_values(address, sut.domain)
    else:
        with _embedded_values(sut, transport, workdir, logs) as values:
            yield values


def _address_values(address: str, domain: str | None) -> dict[str, str]:
    host, port = split_host_port(address)
    return {"sut": address, "sut_host": host, "sut_port": str(port), "domain": domain or testbed.DEFAULT_DOMAIN}


@contextlib.contextmanager
def _embedded_values(sut: EmbeddedSut, transport: str, workdir: Path, logs: Path) -> Iterator[dict[str, str]]:
    auth_users = testbed.read_users_passwords(sut.users) if sut.auth and sut.users is not None else None
    with embedded_kamailio(transport, workdir, logs, auth_users=auth_users) as (kamailio, pki):
        values = _address_values(kamailio.address, kamailio.domain)
        if pki is not None and kamailio.tls_address is not None:  # with a TestPki, the SuT listens for TLS
            values.update(sut_tls=kamailio.tls_address, tls_ca=str(pki.ca_cert), tls_sni=pki.server_name)
        for name, address in (("sut_ws", kamailio.ws_address), ("sut_wss", kamailio.wss_address)):
            if address is not None:
                values[name] = address
        yield values


@contextlib.contextmanager
def embedded_kamailio(
    transport: str, workdir: Path, logs: Path, *, auth_users: dict[str, str] | None = None
) -> Iterator[tuple[testbed.Kamailio, testbed.TestPki | None]]:
    """A started Kamailio (TLS and WebSocket listeners as `transport` asks, see testrun.transport;
    digest auth for `auth_users`, {user: password}) and its PKI; stopped at the end."""
    pki = testbed.make_test_pki(workdir / "pki") if has_tls(transport) else None
    tls = testbed.KamailioTls.server(pki) if pki is not None else None
    kamailio = testbed.Kamailio(
        workdir / "kamailio", tls=tls, auth_users=auth_users, websocket=has_websocket(transport)
    )
    try:
        kamailio.start()
        yield kamailio, pki
    finally:
        kamailio.stop()
        with contextlib.suppress(OSError):
            shutil.copyfile(kamailio.log_path, logs / "kamailio.log")


# ------------------------------------------------------------------ a SuT the test starts


@contextlib.contextmanager
def started_sut(sut: StartedSut, sut_dir: Path, logs: Path) -> Iterator[str]:
    """Start the test's own SuT, wait until it is ready, yield its address (HOST:PORT),
    stop its whole process group at the end."""
    sut_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, _ATTEMPTS + 1):
        fill = _filler(sut, sut_dir)  # new free ports on each attempt
        if sut.kind == "kamailio":
            argv, probes, address = _kamailio_run(sut, sut_dir, fill)
            log_path = logs / "kamailio.log"
        else:
            argv = [fill(token) for token in sut.command]
            log_path = logs / "sut.log"
            probes, address = _command_readiness(sut, log_path, fill)
        process = _start(argv, sut.here, log_path, str(sut))
        try:
            _wait_ready(process, probes, sut, log_path)
            break
        except _PortTaken:
            stop_process(process)
            if attempt == _ATTEMPTS:
                raise
        except BaseException:
            stop_process(process)
            raise
    try:
        yield fill(sut.address) if sut.address else address
    finally:
        stop_process(process)


def _filler(sut: StartedSut, sut_dir: Path) -> Callable[[str], str]:
    """${here}, ${sut_port} (a free port), ${sut_dir} and ${free_port:LABEL} replaced."""
    ports: dict[str, int] = {}
    values = {
        "here": os.fspath(sut.here.resolve()),
        "sut_port": str(testbed.free_port()),
        "sut_dir": os.fspath(sut_dir),
    }

    def port_for(label: str) -> int:
        return ports.setdefault(label, testbed.free_port())

    return lambda text: variables.substitute(text, values, port_for)


def _kamailio_run(sut: StartedSut, sut_dir: Path, fill: Callable[[str], str]) -> tuple[list[str], list[_Probe], str]:
    """The test's Kamailio configuration, filled in and written to its work folder: the
    command that runs it in the foreground, its readiness (every listener) and address."""
    if sut.config is None:  # not met: the model sets config for every kamailio SuT
        raise SutError("a kamailio SuT needs its configuration file")
    config = sut_dir / "kamailio.cfg"
    config.write_text(fill(sut.config.read_text(errors="replace")))
    listeners = kamailio_listeners(config.read_text())
    if not listeners:
        raise SutError(
            f"the Kamailio configuration {sut.config} has no listen=PROTO:HOST:PORT line: "
            "add one, e.g. listen=tcp:127.0.0.1:${sut_port}"
        )
    (sut_dir / "run").mkdir(exist_ok=True)
    argv = [find_program("kamailio", "kamailio"), "-f", os.fspath(config), "-DD", "-E"]
    argv += ["-w", os.fspath(sut_dir), "-Y", os.fspath(sut_dir / "run"), "-P", os.fspath(sut_dir / "kamailio.pid")]
    probes = [_tcp_probe(host, port) if proto != "udp" else _udp_probe(host, port) for proto, host, port in listeners]
    _proto, host, port = listeners[0]
    return argv, probes, format_address((host, port))


def kamailio_listeners(config: str) -> list[tuple[str, str, int]]:
    """(proto, host, port) of each listen= line with a port; proto 'any' when the line
    names none (Kamailio then listens on every transport it has)."""
    return [
        (proto or "any", host.strip("[]"), int(port))
        for proto, host, port in _LISTEN.findall(config)
        if proto in ("", "udp", "tcp", "tls")
    ]


def _command_readiness(sut: StartedSut, log_path: Path, fill: Callable[[str], str]) -> tuple[list[_Probe], str]:
    """A command SuT's readiness and address (the `tcp:` target unless `address` says)."""
    if sut.ready is None:  # not met: the model sets ready for every command SuT
        raise SutError("a command SuT needs 'ready'")
    target = fill(sut.ready.target)
    if sut.ready.kind == "log":
        return [_log_probe(log_path, target)], ""
    host, port = split_host_port(target if ":" in target else f"127.0.0.1:{target}")
    return [_tcp_probe(host, port)], format_address((host, port))


def _tcp_probe(host: str, port: int) -> _Probe:
    def accepts() -> bool:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
        except OSError:
            return False
        return True

    return _Probe(f"nothing accepted TCP on {format_address((host, port))}", accepts)


def _udp_probe(host: str, port: int) -> _Probe:
    return _Probe(
        f"nothing answered an OPTIONS on udp:{format_address((host, port))}",
        lambda: udp_options(host, port, wait=0.2) is not None,
    )


def _log_probe(log_path: Path, pattern: str) -> _Probe:
    regex = re.compile(pattern, re.MULTILINE)

    def logged() -> bool:
        try:
            return regex.search(log_path.read_text(errors="replace")) is not None
        except OSError:
            return False

    return _Probe(f"no line of its output matched {pattern!r}", logged)


def _start(argv: list[str], cwd: Path, log_path: Path, what: str) -> subprocess.Popen[bytes]:
    """`argv` running in its own session (so its whole process group can be stopped),
    its output appended to `log_path`."""
    with open(log_path, "ab") as log:
        try:
            return subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as error:
            raise SutError(f"cannot start the SuT ({what}): {argv[0]}: {error.strerror}") from None


def _wait_ready(process: subprocess.Popen[bytes], probes: list[_Probe], sut: StartedSut, log_path: Path) -> None:
    """Return once every probe holds; raise SutError (naming the SuT, the unmet condition
    and its log) when the process ends first or `sut.timeout` seconds pass."""
    pending = list(probes)

    def ready() -> bool:
        if interrupt.requested():  # a cancelled run does not wait out the SuT's timeout
            raise SutError(f"the SuT ({sut}) was not waited for: fdkeeper run got {interrupt.signal_name()}")
        if process.poll() is not None:
            if _ADDRESS_IN_USE in tail(log_path, 10):
                raise _PortTaken(
                    f"the SuT ({sut}) exited: {_ADDRESS_IN_USE} (on {_ATTEMPTS} tries with new free ports; "
                    f"does it use a fixed one?); see {log_path.name}"
                )
            raise SutError(
                f"the SuT ({sut}) exited with status {process.returncode} before it was ready: "
                f"{last_line(log_path)} (see {log_path.name})"
            )
        pending[:] = [probe for probe in pending if not probe.check()]
        return not pending

    try:
        testbed.wait_until(ready, timeout=sut.timeout, interval=_PROBE_INTERVAL, what="the SuT")
    except TimeoutError:
        raise SutError(
            f"the SuT ({sut}) was not ready within {sut.timeout:g} s (sut: timeout): {pending[0].what}; "
            f"its output: {log_path.name}"
        ) from None
