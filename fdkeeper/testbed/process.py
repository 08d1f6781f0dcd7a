"""A Kamailio process on loopback owned by this Python process: files, start, stop.

Each instance runs Debian's kamailio (package `kamailio`) in the foreground with
everything it writes (config, log, pid file, runtime dir, ctl socket) in its own work
directory, so several run side by side, each on one free loopback port shared by UDP
and TCP (plus a TLS port with `tls=`, and WebSocket ports with `websocket=True`).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, TypeVar

from fdkeeper.address import format_address
from fdkeeper.testbed import configs
from fdkeeper.testbed.kamtls import KamailioTls
from fdkeeper.testbed.net import free_port, tail
from fdkeeper.testbed.sipmsg import udp_options

_Instance = TypeVar("_Instance", bound="KamailioProcess")

# Debian installs kamailio and kamcmd in /usr/sbin, which is not on a normal
# user's PATH: look there too before telling the user to install the package.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# sun_path is 108 bytes; pytest's tmp_path can be longer than that.
_MAX_UNIX_PATH = 100

_MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/kamailio/modules",
    "/usr/lib/aarch64-linux-gnu/kamailio/modules",
    "/usr/lib64/kamailio/modules",
    "/usr/lib/kamailio/modules",
    "/usr/local/lib64/kamailio/modules",
)


def find_program(name: str, package: str) -> str:
    """Path of `name`, searching PATH then the sbin dirs; explain if missing."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
    if path is None:
        raise RuntimeError(
            f"{name} not found (looked in PATH and {', '.join(_SBIN_DIRS)}); "
            f"install the Debian package '{package}' (apt-get install {package})"
        )
    return path


def module_path() -> str:
    """Kamailio's module directory (mpath), with a trailing slash."""
    for candidate in _MODULE_DIRS:
        if os.path.isdir(candidate):
            return candidate + "/"
    found = sorted(Path("/usr/lib").glob("*/kamailio/modules"))
    if found:
        return str(found[0]) + "/"
    raise RuntimeError("kamailio modules not found; install the Debian package 'kamailio'")


WEBSOCKET_PACKAGE = "kamailio-websocket-modules"


def missing_websocket_module() -> str | None:
    """Why this machine's Kamailio cannot take SIP over WebSocket (one line naming the Debian
    package), or None when its websocket module is installed."""
    modules = module_path()
    if os.path.isfile(modules + "websocket.so"):
        return None
    return (
        f"Kamailio's websocket module is not in {modules}; "
        f"install the Debian package '{WEBSOCKET_PACKAGE}' (apt-get install {WEBSOCKET_PACKAGE})"
    )


class KamailioProcess:
    """The lifecycle of one Kamailio: config written, process started and stopped.
    Subclasses write the config (`config_text`).

    Files in `workdir`: kamailio.cfg, tls.cfg (with TLS), kamailio.log
    (appended across restarts), kamailio.pid, run/ (runtime dir, ctl socket).
    """

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        children: int = 2,
        tcp_lifetime: int = 3600,
        tcp_max_connections: int = 4096,
        tls: KamailioTls | None = None,
        tls_port: int | None = None,
        shm_mb: int | None = None,
        websocket: bool = False,
        ws_port: int | None = None,
        wss_port: int | None = None,
        ws_keepalive: int = 180,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        # Shared memory: small by default so instances run side by side; load benches
        # need more (at a few hundred calls/s 64 MB runs out). OpenSSL wants ~61 kB per
        # TLS connection.
        self.shm_mb = shm_mb or (128 if tls else 64)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._port_is_ours = port is None
        self.tls = tls
        self.tls_port: int | None = None
        if tls is not None:
            self.tls_port = tls_port if tls_port is not None else self._other_free_port()
        self._tls_port_is_ours = tls_port is None
        # WebSocket: WS on a TCP port of its own, WSS (with TLS) on a TLS port of its own.
        self.websocket = websocket
        self.ws_port: int | None = None
        self.wss_port: int | None = None
        if websocket:
            self.ws_port = ws_port if ws_port is not None else self._other_free_port()
            if tls is not None:
                self.wss_port = wss_port if wss_port is not None else self._other_free_port()
        self._ws_ports_are_ours = ws_port is None and wss_port is None
        self.ws_keepalive = ws_keepalive
        self._started_once = False
        self.children = children
        self.tcp_lifetime = tcp_lifetime
        self.tcp_max_connections = tcp_max_connections
        self.cfg_path = self.workdir / "kamailio.cfg"
        self.tls_cfg_path = self.workdir / "tls.cfg"
        self.log_path = self.workdir / "kamailio.log"
        self.pid_path = self.workdir / "kamailio.pid"
        self.runtime_dir = self.workdir / "run"
        self._short_dir: Path | None = None  # see ctl_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None

    def _other_free_port(self) -> int:
        """A free port that is none of this instance's ports (the TLS and WebSocket listen ports)."""
        taken = {self.port, getattr(self, "tls_port", None), getattr(self, "ws_port", None)}
        while True:
            port = free_port(self.host)
            if port not in taken:
                return port

    def __enter__(self: _Instance) -> _Instance:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        tls = f" tls:{self.tls_port}" if self.tls else ""
        ws = f" ws:{self.ws_port}" if self.ws_port else ""
        wss = f" wss:{self.wss_port}" if self.wss_port else ""
        return f"<{type(self).__name__} {self.host}:{self.port}{tls}{ws}{wss} {state} in {self.workdir}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def address(self) -> str:
        """IP:PORT (UDP and TCP), the remote-host argument for sipp."""
        return format_address((self.host, self.port))

    @property
    def tls_address(self) -> str | None:
        """IP:TLSPORT, or None without TLS."""
        return None if self.tls_port is None else format_address((self.host, self.tls_port))

    @property
    def ws_address(self) -> str | None:
        """IP:WSPORT (SIP over WebSocket), or None without `websocket`."""
        return None if self.ws_port is None else format_address((self.host, self.ws_port))

    @property
    def wss_address(self) -> str | None:
        """IP:WSSPORT (SIP over secure WebSocket), or None without `websocket` and `tls`."""
        return None if self.wss_port is None else format_address((self.host, self.wss_port))

    # -- configuration -------------------------------------------------

    def config_text(self) -> str:
        raise NotImplementedError

    def global_config(self, name: str, early_modules: str) -> str:
        """The shared global section (global.cfg): `name` in the Server header,
        `early_modules` the loadmodule lines that must come before the shared ones."""
        tls = ""
        if self.tls is not None and self.tls_port is not None:
            tls = self.tls.listen_config(self._cfg_host, self.tls_port, self.tls_cfg_path, self.tcp_lifetime)
        return configs.render(
            "global.cfg",
            name=name,
            host=self._cfg_host,
            port=self.port,
            children=self.children,
            tcp_lifetime=self.tcp_lifetime,
            tcp_max_connections=self.tcp_max_connections,
            open_files_limit=self._open_files_limit(),
            mpath=module_path(),
            ctl_path=self.ctl_path,
            early_modules=early_modules,
            tls=tls,
            websocket=self._websocket_listen_config(),
        )

    def _websocket_listen_config(self) -> str:
        """The global-section lines of the WS (and WSS) listeners, or "" without `websocket`."""
        if self.ws_port is None:
            return ""
        wss = "" if self.wss_port is None else f"listen=tls:{self._cfg_host}:{self.wss_port}"
        return configs.render(
            "ws-listen.cfg",
            host=self._cfg_host,
            ws_port=self.ws_port,
            wss_listen=wss,
            wss_note="" if self.wss_port is None else "; WSS on a TLS port of its own",
            keepalive_timeout=self.ws_keepalive,
        )

    @property
    def _cfg_host(self) -> str:
        return self.host if ":" not in self.host else f"[{self.host}]"

    def _open_files_limit(self) -> int:
        """Room for every connection plus Kamailio's own fds, capped at the
        hard limit: an unprivileged Kamailio asked for more refuses to start."""
        wanted = self.tcp_max_connections + 1024
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)

    @property
    def ctl_path(self) -> str:
        """The ctl (kamcmd) socket: in the work dir, or in a short private
        /tmp dir when the work dir path is too long for a unix socket address
        (removed again by stop())."""
        path = self.runtime_dir / "kamailio_ctl"
        if len(str(path)) <= _MAX_UNIX_PATH:
            return str(path)
        if self._short_dir is None:
            self._short_dir = Path(tempfile.mkdtemp(prefix="fdk-kam-"))
        return str(self._short_dir / "ctl")

    # -- lifecycle -----------------------------------------------------

    def command(self) -> list[str]:
        return [
            find_program("kamailio", "kamailio"),
            "-f",
            str(self.cfg_path),
            "-DD",  # stay in the foreground: we own the process
            "-E",  # log to stderr, which goes to log_path
            "-P",
            str(self.pid_path),
            "-w",
            str(self.workdir),  # core files etc. land here
            "-Y",
            str(self.runtime_dir),  # not the shared /run/kamailio
            "-m",
            str(self.shm_mb),
            "-M",
            "8",  # shm/pkg MB
            "-a",
            "no",
        ]

    def start(self, timeout: float = 10.0) -> None:
        """Write the config, start Kamailio, return once it answers OPTIONS.

        A port we picked ourselves can be taken by someone else between
        free_port() and Kamailio's bind: then try again on new ports (only
        before the first successful start; restart() keeps the ports).
        """
        attempts = 3 if self._port_is_ours and not self._started_once else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                self._started_once = True
                return
            except RuntimeError as exc:
                if attempt + 1 == attempts or "exited" not in str(exc):
                    raise
                self._pick_new_ports()

    def _pick_new_ports(self) -> None:
        """Free ports again for what we picked ourselves (one was taken before Kamailio bound it)."""
        self.port = free_port(self.host)
        if self.tls is not None and self._tls_port_is_ours:
            self.tls_port = None
            self.tls_port = self._other_free_port()
        if self.websocket and self._ws_ports_are_ours:
            self.ws_port = self.wss_port = None
            self.ws_port = self._other_free_port()
            if self.tls is not None:
                self.wss_port = self._other_free_port()

    def _start_once(self, timeout: float) -> None:
        if self.running:
            return
        missing = missing_websocket_module() if self.websocket else None
        if missing is not None:
            raise RuntimeError(f"cannot listen for WebSocket: {missing}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(exist_ok=True)
        self.cfg_path.write_text(self.config_text())
        if self.tls is not None:
            self.tls_cfg_path.write_text(self.tls.config_text())
        for stale in (self.pid_path, Path(self.ctl_path)):
            stale.unlink(missing_ok=True)
        cmd = self.command()
        self._log_file = log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed when the process is stopped
        # The marker tests count: one per start, in the log kept across restarts.
        log_file.write(f"===== fdkeeper.sut: {time.strftime('%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        log_file.flush()
        try:
            # Own session: a Ctrl-C aimed at pytest does not hit Kamailio
            # halfway, and stop() can kill the whole process group.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise RuntimeError(f"cannot run kamailio: {exc}") from exc
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"kamailio exited with status {self._proc.returncode} during start "
                    f"(port {self.port} busy? bad config {self.cfg_path}?); "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            if self.options_ping(wait=0.2) and os.path.exists(self.ctl_path):
                return
            time.sleep(0.05)  # an ICMP "refused" returns at once: do not spin
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"kamailio did not answer OPTIONS on udp:{self.address} within "
                    f"{timeout:.0f} s; log {self.log_path}:\n{tail(self.log_path)}"
                )

    def udp_request(self, user: str | None = None, headers: Sequence[str] = (), wait: float = 1.0) -> bytes | None:
        """One OPTIONS over UDP to this instance (see sipmsg.udp_options)."""
        return udp_options(self.host, self.port, user, headers, wait)

    def options_ping(self, wait: float = 1.0) -> bool:
        """Send one OPTIONS over UDP to the instance itself; True on a 200."""
        data = self.udp_request(wait=wait)
        return data is not None and data.startswith(b"SIP/2.0 200")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout)  # Kamailio's main process stops its children
        self._close_log()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same host/ports (every TCP/TLS
        connection is closed; a SuT loses its registrations)."""
        self.stop()
        self.start(timeout)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """End a process started in its own session: SIGTERM, SIGKILL to its process group after
    `timeout` s; then SIGKILL to the group anyway, so no child that outlived its parent
    (e.g. after a crash) is left holding a port."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.wait(5)
    _killpg(proc.pid)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
