"""The embedded default SuT (System under Test): a Kamailio registrar on loopback.

Used by the project's tests and by `fdkeeper demo`. `Kamailio` writes its own
kamailio.cfg into a work directory and runs Debian's kamailio (package
`kamailio`) in the foreground, so several instances can run side by side:
everything an instance writes (config, log, pid file, runtime dir, ctl socket)
lives in its own work directory, and it listens on one free loopback port
shared by UDP and TCP.

The config is built for what fdkeeper has to prove: a user registered over a
TCP connection is reached over THAT connection and no other. The registrar
sends calls to the connection's source ip:port (`fix_nated_register`), and it
never opens a connection towards a user (`set_forward_no_connect`), so a lost
connection makes a call fail loudly instead of being silently re-created.

With `tls=TlsOptions(...)` (certificates from fdkeeper.testpki) the SuT also
listens for TLS on a second port, routing TLS users exactly like TCP ones.
`close_connections()` makes Kamailio itself close TCP/TLS connections (TLS
with close_notify). `KamailioConverter` is a second, stateless Kamailio that
turns sipp's UDP into TCP or TLS towards the SuT (Debian's sipp has no TLS).

This module also holds the helpers tests use to run sipp without a terminal
(`run_sipp`, `start_sipp`), `place_calls`, a third-party caller over UDP, and
`options_request`/`read_sip_message` for hand-made SIP over TCP or TLS.
"""

from __future__ import annotations

import csv
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from fdkeeper.testbed.pki import TestPki


def _scenarios_dir() -> Path:
    """scenarios/ of a source checkout, or fdkeeper/scenarios when installed
    (pyproject maps the repo's scenarios/ onto the fdkeeper.scenarios package)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "scenarios", package.parent / "scenarios"):
        if (candidate / "uac-call.xml").is_file():
            return candidate
    return package.parent / "scenarios"


# The sipp scenarios shipped with the project.
SCENARIOS_DIR = _scenarios_dir()

DEFAULT_DOMAIN = "fdkeeper.test"

# Debian installs kamailio and kamcmd in /usr/sbin, which is not on a normal
# user's PATH: look there too before telling the user to install the package.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# sun_path is 108 bytes; pytest's tmp_path can be longer than that.
_MAX_UNIX_PATH = 100

# Every line our config logs on purpose starts with this, so tests can grep.
LOG_TAG = "fdkeeper-sut:"


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that is free for both TCP and UDP on `host`.

    Kamailio listens on the same port number for both, so checking one
    protocol only is not enough. There is a race between this check and the
    real bind; callers retry by starting again with a new port if it matters.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as udp:
                    udp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no port free for both TCP and UDP on {host}")


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05,
               what: str = "condition"):
    """Poll `predicate` until it returns something truthy; return that value.

    Raises TimeoutError naming `what`; tests poll the SuT (location,
    connections) instead of sleeping a fixed time.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def find_sipp(sipp: str | None = None) -> str:
    """Path of the sipp binary ($SIPP, else PATH); explain if missing."""
    name = sipp or os.environ.get("SIPP") or "sipp"
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"sipp not found ({name!r}); install the Debian package 'sip-tester' "
            "(apt-get install sip-tester) or set SIPP=/path/to/sipp")
    return path


def _find_program(name: str, package: str) -> str:
    """Path of `name`, searching PATH then the sbin dirs; explain if missing."""
    path = shutil.which(name)
    if path is None:
        path = shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
    if path is None:
        raise RuntimeError(
            f"{name} not found (looked in PATH and {', '.join(_SBIN_DIRS)}); "
            f"install the Debian package '{package}' (apt-get install {package})")
    return path


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _format_addr(host: str, port: int) -> str:
    """IP:PORT, with brackets for IPv6 (as sipp and the control protocol want)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------
# kamailio.cfg
# --------------------------------------------------------------------------

# Filled in with str.format: {name} fields are ours, so the braces of the
# Kamailio language are doubled ({{ }}); $avp/$rU etc. are Kamailio's.
_KAMAILIO_CFG = """\
#!KAMAILIO
# Written by fdkeeper.sut.Kamailio - a throw-away test SuT on loopback.
# Regenerated on every start; edit fdkeeper/sut.py, not this file.

####### global parameters #######
debug=2
log_stderror=yes
# In the foreground with -DD -E; a few workers are plenty for tests.
fork=yes
children={children}
tcp_children={children}
listen=udp:{host}:{port}
listen=tcp:{host}:{port}
{tls_globals}
# Requests to sip:user@DOMAIN are ours ("uri==myself").
alias="{domain}"
# No DNS at all: a test box may have none, and a lookup stall looks like a bug.
auto_aliases=no
dns=no
rev_dns=no
dns_try_ipv6=no
use_dns_cache=off
server_header="Server: fdkeeper-sut"
user_agent_header="User-Agent: fdkeeper-sut"
# Kept connections must outlive any test run (default is 120 s, far too short
# for "register in one sipp run, receive calls in a later one").
tcp_connection_lifetime={tcp_lifetime}
tcp_max_connections={tcp_max_connections}
open_files_limit={open_files_limit}
# Never dial out on TCP for long: if anything does try, fail fast.
tcp_connect_timeout=2
tcp_send_timeout=5
# Keep the TCP keepalive of the OS off our back during tests; SIP-level
# CRLFCRLF pings are answered with CRLF regardless (core default).
tcp_keepalive=no

mpath="{mpath}"

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "ctl.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "nathelper.so"
loadmodule "tcpops.so"
{tls_modules}
# kamcmd talks to this socket; it lives in the work dir so instances never
# share one (the default /run/kamailio/kamailio_ctl would collide).
modparam("ctl", "binrpc", "unix:{ctl_path}")
# ul.dump / core.tcp_list of thousands of users: replies far beyond the 32 kB default.
modparam("ctl", "binrpc_max_body_size", 16384)
modparam("ctl", "binrpc_struct_max_body_size", 16384)

# In-memory location table. handle_lost_tcp: lookup() skips a contact whose
# TCP connection is gone (-> 404 at once), and the usrloc timer deletes it
# from ul.dump. Off, lookup() returns the dead contact and the relay fails
# on set_forward_no_connect() instead (-> 480).
modparam("usrloc", "db_mode", 0)
modparam("usrloc", "handle_lost_tcp", {handle_lost_tcp})
modparam("usrloc", "timer_interval", {ul_timer})

# fix_nated_register() stores the source ip:port of the REGISTER in this
# AVP; the registrar saves it as "received" and lookup() then sends to it
# (the connection), not to the Contact's port (nobody listens there).
modparam("nathelper", "received_avp", "$avp(RECEIVED)")
modparam("registrar", "received_avp", "$avp(RECEIVED)")
modparam("registrar", "max_expires", 7200)

# Record-Route with two entries when the transport changes (UDP caller,
# TCP callee), so ACK/BYE are routed back correctly.
modparam("rr", "enable_double_rr", 1)
modparam("rr", "append_fromtag", 1)

# tm: fail a branch that gets no reply soon, so a dead user gives the caller
# a 408 within the test's time budget.
modparam("tm", "fr_timer", 5000)
modparam("tm", "fr_inv_timer", 10000)

####### routing #######
request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    force_rport();
{control_route}
    # OPTIONS to the server itself: readiness probe and benchmarks.
    if (is_method("OPTIONS") && uri==myself && $rU==$null) {{
        sl_send_reply("200", "OK");
        exit;
    }}

    if (has_totag()) {{
        route(WITHINDLG);
        exit;
    }}

    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            route(RELAY);
        }}
        exit;
    }}
    # Retransmissions are absorbed by tm; a stray ACK without a transaction
    # is dropped.
    if (!is_method("ACK")) {{
        t_check_trans();
    }}
    if (is_method("ACK")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}

    remove_hf("Route");
    if (is_method("INVITE|SUBSCRIBE")) {{
        record_route();
    }}

    if (is_method("REGISTER")) {{
        route(REGISTRAR);
        exit;
    }}

    if ($rU==$null) {{
        sl_send_reply("484", "Address Incomplete");
        exit;
    }}
    route(LOCATION);
}}

route[REGISTRAR] {{
    # Map the peer's Via port onto this connection too, so a reply or
    # request to Via/Contact ip:port would find the connection.
    if (proto==TCP || proto==TLS) {{
        force_tcp_alias();
    }}
    # received = source ip:port (+transport) of this REGISTER.
    fix_nated_register();
    if (!save("location")) {{
        sl_reply_error();
    }}
    xlog("L_INFO", "{tag} registered $tU from $proto:$si:$sp contact $ct\\n");
    exit;
}}

route[LOCATION] {{
    if (!lookup("location")) {{
        xlog("L_NOTICE", "{tag} no contact for $rU (not registered, or its connection was lost) - 404\\n");
        sl_send_reply("404", "Not Found");
        exit;
    }}
    xlog("L_INFO", "{tag} $rm for $rU -> $ru via $du\\n");
    route(RELAY);
}}

route[WITHINDLG] {{
    if (loose_route()) {{
        # R-URI carries ;alias=ip~port~proto (added by set_contact_alias on
        # the callee's reply): turn it into $du = that connection.
        handle_ruri_alias();
        route(RELAY);
        exit;
    }}
    if (is_method("ACK")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    sl_send_reply("404", "Not here");
    exit;
}}

route[RELAY] {{
    # Never open a connection towards a user: only an existing one may be
    # used. A lost connection then fails the call (480 below, or 408 if the
    # connection dies mid-transaction) instead of Kamailio dialling the
    # Contact (or received) address, where nobody may be listening - or
    # worse, where a later sipp run listens and would hide the problem.
    set_forward_no_connect();
    if (is_method("INVITE|BYE|UPDATE|CANCEL|ACK")) {{
        t_on_reply("MANAGE_REPLY");
        t_on_failure("MANAGE_FAILURE");
    }}
    if (!t_relay()) {{
        # send_reply: a t_reply when tm already holds the transaction.
        xlog("L_NOTICE", "{tag} relay of $rm to $ru via $du failed: no open connection to the user - 480\\n");
        send_reply("480", "No Connection To User");
    }}
    exit;
}}

onreply_route[MANAGE_REPLY] {{
    # Replies from a TCP user: mark its Contact with the connection's alias,
    # so the caller's in-dialog requests come back over this connection.
    if ((proto==TCP || proto==TLS) && is_present_hf("Contact")) {{
        set_contact_alias();
    }}
}}

failure_route[MANAGE_FAILURE] {{
    if (t_is_canceled()) {{
        exit;
    }}
    xlog("L_NOTICE", "{tag} $rm to $ru via $du failed with $T_reply_code\\n");
}}
"""


# --------------------------------------------------------------------------
# TLS, the test-control route, and the converter's config
# --------------------------------------------------------------------------

# The user part of the control request close_connections() sends over UDP
# from loopback: `OPTIONS sip:fdkeeper-close-connection@IP:PORT` with the
# connection id in a header. Only answered from one of our own addresses.
CLOSE_CONNECTION_USER = "fdkeeper-close-connection"
_CLOSE_CONNECTION_HEADER = "X-Fdkeeper-Conid"

# Plain Kamailio text (inserted as a value, not formatted again).
_CONTROL_ROUTE = """
    # Test control (close_connections()): close one TCP/TLS connection by
    # id. tcpops asks tcp_main to close it (CONN_EOF); for TLS with
    # send_close_notify=1 a close_notify alert precedes the FIN. Kamailio
    # 5.6 has no RPC for this, hence a request; loopback UDP only.
    if (is_method("OPTIONS") && $rU=="@USER@" && proto==UDP && src_ip==myself) {
        $var(conid) = $(hdr(@HEADER@){s.int});
        if (tcp_close_connection("$var(conid)")) {
            xlog("L_INFO", "@TAG@ closing connection $var(conid) on request\\n");
            sl_send_reply("200", "Closing");
        } else {
            sl_send_reply("404", "No Such Connection");
        }
        exit;
    }
""".replace("@USER@", CLOSE_CONNECTION_USER).replace(
    "@HEADER@", _CLOSE_CONNECTION_HEADER).replace("@TAG@", LOG_TAG)


@dataclass(frozen=True)
class TlsOptions:
    """TLS for a Kamailio instance (SuT or converter): its own tls.cfg.
    (Not fdkeeper.tls.TlsOptions, which is the keeper's client side.)

    cert/key: this instance's certificate (PEM), presented as TLS server and,
    unless client_cert/client_key are given, as TLS client too.
    ca: the `ca_list` (PEM) that peers' certificates are verified against.
    require_client_cert: server side asks for a client certificate and
    refuses the handshake without a valid one (verify_certificate +
    require_certificate = yes; needs `ca`). verify_client_cert: verify a
    client certificate when one is sent, without requiring one (defaults to
    require_client_cert).
    verify_server_cert: client side ([client:default], the converter towards
    the SuT) verifies the server's chain against `ca`. Kamailio 5.6 checks
    the chain only, not the name.
    send_close_notify: tls modparam send_close_notify: a TLS connection that
    Kamailio closes gets a close_notify alert before the FIN (default off in
    Kamailio; on here so close_connections() closes cleanly).
    method: the `method` of both sections ("TLSv1.2+": 1.2 or 1.3).
    """

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False
    verify_client_cert: bool | None = None
    verify_server_cert: bool = False
    client_cert: Path | None = None
    client_key: Path | None = None
    send_close_notify: bool = True
    method: str = "TLSv1.2+"

    @classmethod
    def server(cls, pki: TestPki, *, require_client_cert: bool = False,
               **options) -> "TlsOptions":
        """The SuT's side of a fdkeeper.testpki.TestPki."""
        return cls(cert=pki.server_cert, key=pki.server_key, ca=pki.ca_cert,
                   require_client_cert=require_client_cert, **options)

    @classmethod
    def client(cls, pki: TestPki, *, verify_server_cert: bool = True,
               **options) -> "TlsOptions":
        """A client of the SuT (the converter) with the TestPki's client cert."""
        return cls(cert=pki.client_cert, key=pki.client_key, ca=pki.ca_cert,
                   verify_server_cert=verify_server_cert, **options)

    def __post_init__(self) -> None:
        wants_ca = (self.require_client_cert or self.verify_client_cert
                    or self.verify_server_cert)
        if wants_ca and self.ca is None:
            raise ValueError("TlsOptions: verifying peers needs ca=")

    def config_text(self) -> str:
        """The tls.cfg (Kamailio's own INI-like format)."""
        def yes(flag: bool | None) -> str:
            return "yes" if flag else "no"

        verify_client = (self.require_client_cert if self.verify_client_cert is None
                         else self.verify_client_cert)
        ca_line = f"ca_list = {Path(self.ca).resolve()}\n" if self.ca else ""
        return (
            "# Written by fdkeeper.sut - test TLS on loopback.\n"
            "[server:default]\n"
            f"method = {self.method}\n"
            f"verify_certificate = {yes(verify_client)}\n"
            f"require_certificate = {yes(self.require_client_cert)}\n"
            f"certificate = {Path(self.cert).resolve()}\n"
            f"private_key = {Path(self.key).resolve()}\n"
            f"{ca_line}"
            "\n[client:default]\n"
            f"method = {self.method}\n"
            f"verify_certificate = {yes(self.verify_server_cert)}\n"
            "require_certificate = no\n"
            f"certificate = {Path(self.client_cert or self.cert).resolve()}\n"
            f"private_key = {Path(self.client_key or self.key).resolve()}\n"
            f"{ca_line}")


def _tls_globals(host: str, tls_port: int) -> str:
    return f"enable_tls=yes\nlisten=tls:{host}:{tls_port}"


def _tls_modules(tls: TlsOptions, tls_cfg: Path, lifetime: int) -> str:
    # tls_log=2 (L_INFO): the module's "tls_accept: new connection from ..."
    # and "tls_connect: ..." lines show in the log at debug=2.
    return (
        'loadmodule "tls.so"\n'
        f'modparam("tls", "config", "{tls_cfg}")\n'
        f'modparam("tls", "send_close_notify", {int(tls.send_close_notify)})\n'
        'modparam("tls", "tls_log", 2)\n'
        # The tls module has its own idle timeout (default 600 s), which
        # overrides tcp_connection_lifetime for TLS connections.
        f'modparam("tls", "connection_timeout", {lifetime})\n')


# The stateless UDP -> TCP/TLS converter (KamailioConverter). Same {name}
# and doubled-brace rules as _KAMAILIO_CFG.
_CONVERTER_CFG = """\
#!KAMAILIO
# Written by fdkeeper.sut.KamailioConverter - a stateless UDP <-> {transport_upper}
# converter on loopback. Regenerated on every start.

debug=2
log_stderror=yes
fork=yes
children={children}
tcp_children={children}
listen=udp:{host}:{port}
listen=tcp:{host}:{port}
{tls_globals}
auto_aliases=no
dns=no
rev_dns=no
dns_try_ipv6=no
use_dns_cache=off
server_header="Server: fdkeeper-converter"
user_agent_header="User-Agent: fdkeeper-converter"
# Outgoing TCP/TLS connections are bound to the listen socket's port
# (SO_REUSEPORT; only for a forced send socket, see force_send_socket), so the connection's source ip:port is the address in our
# Via and Record-Route: the SuT, which never dials out, finds the connection
# for its requests towards us by that address.
tcp_reuse_port=yes
tcp_connection_lifetime={tcp_lifetime}
tcp_max_connections={tcp_max_connections}
open_files_limit={open_files_limit}
tcp_connect_timeout=2
tcp_send_timeout=5
tcp_keepalive=no

mpath="{mpath}"

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "ctl.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "tcpops.so"
{tls_modules}
modparam("ctl", "binrpc", "unix:{ctl_path}")
# ul.dump / core.tcp_list of thousands of users: replies far beyond the 32 kB default.
modparam("ctl", "binrpc_max_body_size", 16384)
modparam("ctl", "binrpc_struct_max_body_size", 16384)
# Two Record-Route entries when the transport changes (UDP <-> TCP/TLS).
modparam("rr", "enable_double_rr", 1)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
{control_route}
    # OPTIONS to the converter itself (R-URI = our own ip:port): readiness.
    if (is_method("OPTIONS") && uri==myself && $rU==$null) {{
        sl_send_reply("200", "OK");
        exit;
    }}
    if (has_totag()) {{
        # Strip our own Route entries; the destination is fixed below.
        loose_route();
    }} else if (is_method("INVITE|SUBSCRIBE|REFER")) {{
        record_route();
    }}
    if (proto==UDP) {{
        # From sipp: to the SuT over {transport_upper}, from our listen socket
        # (with tcp_reuse_port, a forced socket is what binds the source port).
        $du = "{sut_uri}";
        force_send_socket({send_socket});
    }} else {{
        # From the SuT: to sipp over UDP.
        {to_sipp}
    }}
    # Stateless: no transaction, replies go back by Via.
    if (!forward()) {{
        xlog("L_NOTICE", "{tag} converter: forward of $rm to $du failed\\n");
        sl_send_reply("503", "Converter Cannot Forward");
    }}
    exit;
}}
"""


# --------------------------------------------------------------------------
# kamcmd output
# --------------------------------------------------------------------------

def parse_kamcmd(text: str) -> list:
    """Parse kamcmd's default text output into Python lists/dicts.

    kamcmd prints structs as `{` ... `}` with `key: value` lines, a named
    struct member as `key: {`, and arrays as a sequence of values at top
    level. A key repeated inside one struct (e.g. several `Contact:` members
    of an AoR) becomes a list, so repeated members are never lost.
    Good enough for ul.dump and core.tcp_list; a bare array value that
    itself contains ": " would be read as a key.
    """
    root: list = []
    stack: list = [root]

    def add(container, key: str | None, value) -> None:
        if isinstance(container, list):
            container.append(value if key is None else {key: value})
        elif key in container:
            old = container[key]
            if isinstance(old, list) and getattr(old, "_multi", False):
                old.append(value)
            else:
                multi = _MultiList([old, value])
                container[key] = multi
        else:
            container[key] = value

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line == "}":
            if len(stack) > 1:
                stack.pop()
            continue
        if line == "{":
            new: dict = {}
            add(stack[-1], None, new)
            stack.append(new)
            continue
        key, sep, value = line.partition(":")
        if not sep:
            add(stack[-1], None, line)
            continue
        value = value.strip()
        if value == "{":
            new = {}
            add(stack[-1], key.strip(), new)
            stack.append(new)
        else:
            add(stack[-1], key.strip(), value)
    return root


class _MultiList(list):
    """A list made from repeated struct keys (not a value kamcmd printed)."""
    _multi = True


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


_SIP_HOSTPORT = re.compile(
    r"^(?:sips?:)?(?:[^@;>]*@)?(?P<host>\[[^\]]+\]|[^:;>]+)(?::(?P<port>\d+))?"
    r"(?P<params>[^>]*)")


def parse_sip_target(uri: str) -> dict:
    """Split `sip:127.0.0.1:40312;transport=TCP` into host, port, transport.

    Used on the registrar's `received` (the connection's source address):
    that is where calls to the user go.
    """
    result: dict = {"host": None, "port": None, "transport": None}
    if not uri or uri == "[not set]":
        return result
    match = _SIP_HOSTPORT.match(uri.strip().strip("<>"))
    if not match:
        return result
    result["host"] = match.group("host").strip("[]")
    if match.group("port"):
        result["port"] = int(match.group("port"))
    transport = re.search(r";transport=([A-Za-z]+)", match.group("params") or "")
    result["transport"] = transport.group(1).lower() if transport else "udp"
    return result


# --------------------------------------------------------------------------
# the SuT
# --------------------------------------------------------------------------

class KamailioInstance:
    """A Kamailio process on loopback owned by this Python process: the
    lifecycle, logs, RPC and connection helpers that the SuT (`Kamailio`) and
    the converter (`KamailioConverter`) share. Subclasses write the config.

    Files in `workdir`: kamailio.cfg, tls.cfg (with TLS), kamailio.log
    (appended across restarts), kamailio.pid, run/ (runtime dir, ctl socket).
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1",
                 port: int | None = None, *, children: int = 2,
                 tcp_lifetime: int = 3600, tcp_max_connections: int = 4096,
                 tls: TlsOptions | None = None, tls_port: int | None = None,
                 shm_mb: int | None = None) -> None:
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
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    def _other_free_port(self) -> int:
        """A free port that is not self.port (the TLS listen port)."""
        while True:
            port = free_port(self.host)
            if port != self.port:
                return port

    # -- lifecycle -----------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        tls = f" tls:{self.tls_port}" if self.tls else ""
        return (f"<{type(self).__name__} {self.host}:{self.port}{tls} {state} "
                f"in {self.workdir}>")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def address(self) -> str:
        """IP:PORT (UDP and TCP), the remote-host argument for sipp."""
        return _format_addr(self.host, self.port)

    @property
    def tls_address(self) -> str | None:
        """IP:TLSPORT, or None without TLS."""
        return None if self.tls_port is None else _format_addr(self.host, self.tls_port)

    def config_text(self) -> str:
        raise NotImplementedError

    def _tls_fields(self) -> dict[str, str]:
        """tls_globals / tls_modules for the config templates ('' without TLS)."""
        if self.tls is None or self.tls_port is None:
            return {"tls_globals": "", "tls_modules": ""}
        return {"tls_globals": _tls_globals(self._cfg_host, self.tls_port),
                "tls_modules": _tls_modules(self.tls, self.tls_cfg_path,
                                            self.tcp_lifetime)}

    @property
    def _cfg_host(self) -> str:
        return self.host if ":" not in self.host else f"[{self.host}]"

    def command(self) -> list[str]:
        return [
            _find_program("kamailio", "kamailio"),
            "-f", str(self.cfg_path),
            "-DD",                      # stay in the foreground: we own the process
            "-E",                       # log to stderr, which goes to log_path
            "-P", str(self.pid_path),
            "-w", str(self.workdir),    # core files etc. land here
            "-Y", str(self.runtime_dir),  # not the shared /run/kamailio
            "-m", str(self.shm_mb), "-M", "8",    # shm/pkg MB
            "-a", "no",
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
                self.port = free_port(self.host)
                if self.tls is not None and self._tls_port_is_ours:
                    self.tls_port = self._other_free_port()

    def _start_once(self, timeout: float) -> None:
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(exist_ok=True)
        self.cfg_path.write_text(self.config_text())
        if self.tls is not None:
            self.tls_cfg_path.write_text(self.tls.config_text())
        for stale in (self.pid_path, Path(self.ctl_path)):
            stale.unlink(missing_ok=True)
        cmd = self.command()
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(
            f"===== fdkeeper.sut: {time.strftime('%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        try:
            # Own session: a Ctrl-C aimed at pytest does not hit Kamailio
            # halfway, and stop() can kill the whole process group.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
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
                    f"log {self.log_path}:\n{_tail(self.log_path)}")
            if self.options_ping(wait=0.2) and os.path.exists(self.ctl_path):
                return
            time.sleep(0.05)  # an ICMP "refused" returns at once: do not spin
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"kamailio did not answer OPTIONS on udp:{self.address} within "
                    f"{timeout:.0f} s; log {self.log_path}:\n{_tail(self.log_path)}")

    def _udp_request(self, user: str | None = None, headers: Sequence[str] = (),
                     wait: float = 1.0) -> bytes | None:
        """Send one OPTIONS over UDP to this instance, R-URI = its own address
        (with `user` if given); return the response, None on timeout/error."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        ruri = f"sip:{user}@{self.address}" if user else f"sip:{self.address}"
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((self.host, 0))
            sock.settimeout(wait)
            lport = sock.getsockname()[1]
            msg = options_request(ruri, f"SIP/2.0/UDP {_format_addr(self.host, lport)}",
                                  headers=headers)
            try:
                sock.sendto(msg, (self.host, self.port))
                data, _ = sock.recvfrom(65535)
            except OSError:  # timeout, or ICMP refused while not yet bound
                return None
        return data

    def options_ping(self, wait: float = 1.0) -> bool:
        """Send one OPTIONS over UDP to the instance itself; True on a 200."""
        data = self._udp_request(wait=wait)
        return data is not None and data.startswith(b"SIP/2.0 200")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Kamailio's main process stops its children
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._killpg(proc.pid)
                    proc.wait(5)
            # Children that outlived their parent (e.g. after a crash) are in
            # the same process group: never leave them holding the port.
            self._killpg(proc.pid)
        self._close_log()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same host/ports (every TCP/TLS
        connection is closed; a SuT loses its registrations)."""
        self.stop()
        self.start(timeout)

    def _open_files_limit(self) -> int:
        """Room for every connection plus Kamailio's own fds, capped at the
        hard limit: an unprivileged Kamailio asked for more refuses to start."""
        wanted = self.tcp_max_connections + 1024
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)

    @staticmethod
    def _killpg(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

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

    @staticmethod
    def _module_path() -> str:
        for candidate in ("/usr/lib/x86_64-linux-gnu/kamailio/modules",
                          "/usr/lib/aarch64-linux-gnu/kamailio/modules",
                          "/usr/lib64/kamailio/modules", "/usr/lib/kamailio/modules",
                          "/usr/local/lib64/kamailio/modules"):
            if os.path.isdir(candidate):
                return candidate + "/"
        found = sorted(Path("/usr/lib").glob("*/kamailio/modules"))
        if found:
            return str(found[0]) + "/"
        raise RuntimeError("kamailio modules not found; install the Debian package 'kamailio'")

    # -- logs ----------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def tls_handshakes(self) -> list[dict]:
        """TLS handshakes this instance completed, from its log (tls_log=2).

        One dict per handshake, oldest first: direction ("in": a client
        connected to us, "out": we connected), peer ("ip:port"), peer_port,
        version (e.g. "TLSv1.3"), cipher, client_cert (for "in": True when
        the client presented a certificate, False when not) and
        peer_subject (the peer certificate's subject, e.g.
        "/O=fdkeeper tests/CN=alice.fdkeeper.test", or None).
        A failed handshake is not listed: see tls_errors().
        """
        result: list[dict] = []
        for line in self.log_text().splitlines():
            match = _TLS_HANDSHAKE_RE.search(line)
            if match:
                result.append({
                    "direction": "in" if match.group("dir") == "accept" else "out",
                    "peer": match.group("peer"),
                    "peer_port": int(match.group("peer").rsplit(":", 1)[1]),
                    "version": match.group("version"),
                    "cipher": match.group("cipher"),
                    "client_cert": None,
                    "peer_subject": None,
                })
            elif result:
                last = result[-1]
                if "client did not present a certificate" in line:
                    last["client_cert"] = False
                subject = re.search(r"tls_(?:accept|connect): (?:client|server) "
                                    r"certificate subject:\s*(.*)$", line)
                if subject:
                    last["peer_subject"] = subject.group(1).strip()
                    if last["direction"] == "in":
                        last["client_cert"] = True
        return result

    def tls_errors(self) -> list[str]:
        """OpenSSL errors of failed TLS handshakes/reads from the log, e.g.
        "TLS accept:error:0A0000C7:SSL routines::peer did not return a
        certificate (sni: sut.test)"."""
        return [match.group(1).strip() for match in
                re.finditer(r"tls_err_ret\(\): (.*)$", self.log_text(), re.M)]

    # -- RPC -----------------------------------------------------------

    def rpc(self, *args: str, timeout: float = 5.0) -> str:
        """Run one kamcmd command over this instance's ctl socket."""
        if not self.running:
            raise RuntimeError(f"kamailio is not running ({self})")
        cmd = [_find_program("kamcmd", "kamailio"), "-s", f"unix:{self.ctl_path}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"kamcmd {' '.join(args)} failed ({proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def tcp_connections(self) -> list[dict]:
        """Kamailio's TCP and TLS connections (kamcmd core.tcp_list).

        Keys: id, type ("TCP" or "TLS"), state, local/remote as "ip:port"
        plus local_port and remote_port as ints, timeout, ref_count.
        """
        tree = parse_kamcmd(self.rpc("core.tcp_list"))
        result = []
        for item in tree:
            if not isinstance(item, dict) or "id" not in item:
                continue
            conn = dict(item)
            for side in ("src", "dst"):
                ip, port = conn.get(f"{side}_ip"), conn.get(f"{side}_port")
                if ip is not None and port is not None:
                    conn[f"{side}_port"] = int(port)
            # Kamailio's src is the peer (remote), dst is its own listen side.
            conn["remote"] = _format_addr(conn.get("src_ip", "?"), conn.get("src_port", 0))
            conn["local"] = _format_addr(conn.get("dst_ip", "?"), conn.get("dst_port", 0))
            conn["remote_port"] = conn.get("src_port")
            conn["local_port"] = conn.get("dst_port")
            result.append(conn)
        return result

    def tls_connections(self) -> list[dict]:
        """The TLS ones of tcp_connections()."""
        return [c for c in self.tcp_connections() if str(c.get("type")).upper() == "TLS"]

    def close_connections(self, conids: Iterable[int] | None = None, *,
                          remote_port: int | None = None,
                          timeout: float = 10.0) -> list[dict]:
        """Make Kamailio close TCP/TLS connections itself; return the ones closed.

        All of them by default, or those with an id in `conids`, or the one
        from `remote_port`. For each, a control OPTIONS over loopback UDP
        runs tcpops' tcp_close_connection(id) (Kamailio 5.6.3 has no RPC to
        close a connection): the worker sends CONN_EOF to tcp_main, which
        unhashes the connection and closes its socket. What the peer sees:
        TCP - a FIN (EOF on read; no RST, nothing sent before it); TLS - a
        TLS close_notify alert, then the FIN (tls modparam send_close_notify=1,
        the TlsOptions default; without it just the FIN, which a TLS client
        reads as an unexpected EOF). Measured: the peer reads EOF within a
        few ms, also right after a request. Kamailio never re-opens it (the
        SuT has set_forward_no_connect); a contact registered over it is
        then treated as lost (handle_lost_tcp). Waits until core.tcp_list no
        longer shows the connections. restart() is the heavy alternative.
        """
        wanted = None if conids is None else {int(c) for c in conids}
        targets = [c for c in self.tcp_connections()
                   if (wanted is None or int(c["id"]) in wanted)
                   and (remote_port is None or c["remote_port"] == remote_port)]
        for conn in targets:
            reply = self._udp_request(CLOSE_CONNECTION_USER,
                                      [f"{_CLOSE_CONNECTION_HEADER}: {conn['id']}"], wait=2.0)
            if reply is None or not reply.startswith((b"SIP/2.0 200", b"SIP/2.0 404")):
                raise RuntimeError(f"close of connection {conn['id']} not acknowledged: "
                                   f"{reply!r}; log:\n{self.log_tail()}")
        ids = {c["id"] for c in targets}
        if ids:
            wait_until(lambda: not ids & {c["id"] for c in self.tcp_connections()},
                       timeout=timeout, interval=0.1,
                       what=f"connections {sorted(ids)} to close")
        return targets


_TLS_HANDSHAKE_RE = re.compile(
    r"tls_(?P<dir>accept|connect): new connection (?:from|to) (?P<peer>\S+) using "
    r"(?P<version>\S+) (?P<cipher>\S+)")


def options_request(ruri: str, via: str, *, headers: Sequence[str] = (),
                    from_domain: str = DEFAULT_DOMAIN) -> bytes:
    """An OPTIONS request as bytes (for UDP, TCP or TLS; Content-Length 0).

    `via` is the Via value without branch, e.g. "SIP/2.0/TLS 127.0.0.1:5061".
    """
    branch = "z9hG4bK" + uuid.uuid4().hex[:16]
    to_uri = re.sub(r"^(sips?:)[^@]*@", r"\1", ruri)
    extra = "".join(f"{line}\r\n" for line in headers)
    return (
        f"OPTIONS {ruri} SIP/2.0\r\n"
        f"Via: {via};branch={branch};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:probe@{from_domain}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <{to_uri}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}@fdkeeper-probe\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"{extra}"
        f"Content-Length: 0\r\n\r\n").encode()


def read_sip_message(sock, timeout: float = 5.0) -> bytes:
    """Read one SIP message (headers + Content-Length body) from a stream
    socket (TCP or an ssl.SSLSocket); leading CRLFs (keep-alive pongs) are
    skipped. Raises ConnectionError on EOF before a whole message."""
    sock.settimeout(timeout)
    data = b""
    while True:
        data = data.lstrip(b"\r\n")
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            match = re.search(rb"^(?:Content-Length|l)\s*:\s*(\d+)", head, re.I | re.M)
            length = int(match.group(1)) if match else 0
            if len(rest) >= length:
                return head + sep + rest[:length]
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} bytes of a SIP message")
        data += chunk


class Kamailio(KamailioInstance):
    """The SuT: a Kamailio registrar/proxy on loopback, owned by this process.

    >>> with Kamailio(tmp_path) as sut:
    ...     sut.port, sut.location(), sut.tcp_connections()

    Options beyond the basic ones: `children` (UDP and TCP workers each),
    `tcp_lifetime` (s, idle TCP connections are kept this long),
    `tcp_max_connections`, `ul_timer` (s between usrloc timer runs, which
    drop contacts of lost connections), `handle_lost_tcp` (False: lookup()
    keeps returning a dead contact and the relay fails with 480 instead of
    the lookup failing with 404).
    `tls=TlsOptions(...)` adds a TLS listener on `tls_port` (a second free
    port unless given; `tls_address`) with its own tls.cfg in the work dir.
    TLS users are routed like TCP ones: REGISTER over TLS, calls and
    in-dialog requests only over the registering TLS connection.
    Files in `workdir`: kamailio.cfg, tls.cfg, kamailio.log (appended across
    restarts), kamailio.pid, run/ (runtime dir and ctl socket).
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1",
                 port: int | None = None, domain: str = DEFAULT_DOMAIN, *,
                 children: int = 2, tcp_lifetime: int = 3600,
                 tcp_max_connections: int = 4096, ul_timer: int = 5,
                 handle_lost_tcp: bool = True, tls: TlsOptions | None = None,
                 tls_port: int | None = None, shm_mb: int | None = None) -> None:
        super().__init__(workdir, host, port, children=children, tcp_lifetime=tcp_lifetime,
                         tcp_max_connections=tcp_max_connections, tls=tls,
                         tls_port=tls_port, shm_mb=shm_mb)
        self.domain = domain
        self.ul_timer = ul_timer
        self.handle_lost_tcp = handle_lost_tcp

    def __repr__(self) -> str:
        return super().__repr__().replace(" running", f" {self.domain} running").replace(
            " stopped", f" {self.domain} stopped")

    @property
    def uri(self) -> str:
        return f"sip:{self.domain}"

    def config_text(self) -> str:
        return _KAMAILIO_CFG.format(
            host=self._cfg_host,
            port=self.port, domain=self.domain, children=self.children,
            tcp_lifetime=self.tcp_lifetime,
            tcp_max_connections=self.tcp_max_connections,
            open_files_limit=self._open_files_limit(),
            mpath=self._module_path(), ctl_path=self.ctl_path,
            ul_timer=self.ul_timer, handle_lost_tcp=int(self.handle_lost_tcp),
            tag=LOG_TAG, control_route=_CONTROL_ROUTE, **self._tls_fields())

    def location(self, aors: Iterable[str] | None = None) -> list[dict]:
        """The registrar's contacts, one dict per contact.

        Keys: aor, contact, received, socket, expires, callid, cseq,
        user_agent, and source = {host, port, transport} taken from
        `received` (the connection the user registered from), or from the
        Contact when nothing was received.
        With `aors` (user names as the registrar keys them), each is looked up
        on its own: kamcmd cannot take a ul.dump of a few hundred users
        ("reply too big").
        """
        if aors is not None:
            return [contact for aor in aors for contact in self._lookup(aor)]
        tree = parse_kamcmd(self.rpc("ul.dump"))
        result = []
        for top in tree:
            if not isinstance(top, dict):
                continue
            for domain in _as_list(_dig(top, "Domains", "Domain")):
                for info in _as_list(_dig(domain, "AoRs", "Info")):
                    aor = info.get("AoR")
                    for contact in _as_list(_dig(info, "Contacts", "Contact")):
                        result.append(_contact_dict(aor, contact))
        return result


    def _lookup(self, aor: str) -> list[dict]:
        try:
            tree = parse_kamcmd(self.rpc("ul.lookup", "location", aor))
        except RuntimeError:
            return []  # not registered (or no live contact)
        return [
            _contact_dict(top.get("AoR"), contact)
            for top in tree
            if isinstance(top, dict) and "AoR" in top
            for contact in _as_list(_dig(top, "Contacts", "Contact"))
        ]


class KamailioConverter(KamailioInstance):
    """A stateless UDP <-> TCP/TLS converter in front of a SuT (for benches).

    Listens on UDP (and TCP, same port) at host:port; every request that
    sipp sends over UDP is forwarded statelessly to the SuT at
    sut_host:sut_port over `transport` ("tcp" or "tls"; TLS needs
    `tls=TlsOptions(...)`, e.g. TlsOptions.client(pki), and listens on
    `tls_port`). Requests that arrive from the SuT over TCP/TLS go to sipp
    over UDP: to `sipp_address` ("ip:port") if given, else by their R-URI
    (the Contact sipp registered). Replies go back by Via. Dialog-creating
    requests are record-routed (two entries: UDP side and SuT side), so the
    in-dialog requests of both directions come back through the converter.
    Outgoing connections are bound to the converter's listen port
    (tcp_reuse_port), which is what its Via and Record-Route name: the SuT
    reaches the converter over the one connection the converter opened.

    Kamailio 5.6.3 as a stateless TLS converter aborted (double free in its
    TLS layer) under load towards a refused destination: point load benches
    at a live SuT only.
    """

    def __init__(self, workdir: Path, sut_host: str, sut_port: int,
                 transport: str = "tcp", *, host: str = "127.0.0.1",
                 port: int | None = None, sipp_address: str | None = None,
                 tls: TlsOptions | None = None, tls_port: int | None = None,
                 children: int = 2, tcp_lifetime: int = 3600,
                 tcp_max_connections: int = 4096) -> None:
        transport = transport.lower()
        if transport not in ("tcp", "tls"):
            raise ValueError(f"transport must be 'tcp' or 'tls', not {transport!r}")
        if transport == "tls" and tls is None:
            raise ValueError("a TLS converter needs tls=TlsOptions(...) "
                             "(e.g. TlsOptions.client(pki))")
        super().__init__(workdir, host, port, children=children, tcp_lifetime=tcp_lifetime,
                         tcp_max_connections=tcp_max_connections, tls=tls,
                         tls_port=tls_port)
        self.sut_host = sut_host
        self.sut_port = sut_port
        self.transport = transport
        self.sipp_address = sipp_address

    @classmethod
    def for_sut(cls, workdir: Path, sut: Kamailio, transport: str = "tcp",
                **options) -> "KamailioConverter":
        """A converter towards `sut`'s TCP port or (transport="tls") TLS port."""
        if transport == "tls" and sut.tls_port is None:
            raise ValueError(f"{sut} has no TLS listener")
        port = sut.tls_port if transport == "tls" else sut.port
        return cls(workdir, sut.host, port, transport, **options)

    @property
    def sut_uri(self) -> str:
        return f"sip:{_format_addr(self.sut_host, self.sut_port)};transport={self.transport}"

    def config_text(self) -> str:
        if self.sipp_address:
            to_sipp = f'$du = "sip:{self.sipp_address};transport=udp";'
        else:
            to_sipp = "$du = $null;  # by R-URI: the Contact that sipp registered"
        return _CONVERTER_CFG.format(
            host=self._cfg_host, port=self.port, children=self.children,
            tcp_lifetime=self.tcp_lifetime,
            tcp_max_connections=self.tcp_max_connections,
            open_files_limit=self._open_files_limit(),
            mpath=self._module_path(), ctl_path=self.ctl_path, tag=LOG_TAG,
            transport_upper=self.transport.upper(), sut_uri=self.sut_uri,
            to_sipp=to_sipp, send_socket=self.send_socket,
            control_route=_CONTROL_ROUTE, **self._tls_fields())

    @property
    def send_socket(self) -> str:
        """The converter's own socket towards the SuT, proto:ip:port: the
        source address of its one connection to the SuT."""
        port = self.tls_port if self.transport == "tls" else self.port
        return f"{self.transport}:{_format_addr(self.host, port)}"


def _dig(node, *keys):
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _contact_dict(aor: str | None, contact: dict) -> dict:
    received = contact.get("Received")
    received = None if received in (None, "[not set]") else received
    source = parse_sip_target(received or contact.get("Address", ""))
    return {
        "aor": aor,
        "contact": contact.get("Address"),
        "received": received,
        "socket": contact.get("Socket"),
        "expires": contact.get("Expires"),
        "callid": contact.get("Call-ID"),
        "cseq": contact.get("CSeq"),
        "user_agent": contact.get("User-Agent"),
        "source": source,
        "raw": dict(contact),
    }


# --------------------------------------------------------------------------
# running sipp without a terminal
# --------------------------------------------------------------------------

@dataclass
class SippResult:
    """What a finished sipp run left behind (counts from its -trace_stat file)."""
    returncode: int | None          # sipp's exit status (negative: killed by signal)
    successful: int                 # SuccessfulCall(C)
    failed: int                     # FailedCall(C)
    log_dir: Path
    name: str
    command: list[str] = field(default_factory=list)
    stats: dict[str, str] = field(default_factory=dict)  # last -trace_stat row

    def count(self, column: str) -> int:
        """A cumulative counter, e.g. count("IncomingCall(C)")."""
        try:
            return int(self.stats.get(column, "0") or 0)
        except ValueError:
            return 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.failed == 0 and self.successful > 0

    def file(self, kind: str) -> Path:
        """kind: stat, errors, screen, messages, stdout, stderr."""
        suffix = {"stat": "stat.csv"}.get(kind, f"{kind}.log")
        return self.log_dir / f"{self.name}.{suffix}"

    def text(self, kind: str) -> str:
        try:
            return self.file(kind).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def summary(self, lines: int = 30) -> str:
        """A block for assertion messages: status, counts, and log tails."""
        parts = [f"sipp {self.name}: exit {self.returncode}, successful {self.successful}, "
                 f"failed {self.failed}; logs in {self.log_dir}",
                 "command: " + " ".join(self.command)]
        for kind in ("stderr", "errors", "screen"):
            text = self.text(kind).strip()
            if text:
                tail = "\n".join(text.splitlines()[-lines:])
                parts.append(f"--- {kind} ---\n{tail}")
        return "\n".join(parts)


# place_calls() returns the same record; the API calls it CallResult.
CallResult = SippResult


# sipp exit codes (include/defines.h): 0 all calls OK, 1 some failed,
# 97 internal command / timeout without success, 99 no call processed,
# 255 (-1) fatal error, 254 (-2) cannot bind.
SIPP_EXIT_OK = 0
SIPP_EXIT_FAILED = 1


def sipp_command(sipp: str, scenario: str | Path, remote: str, *, log_dir: Path, name: str,
                 transport: str = "u1", local_ip: str = "127.0.0.1",
                 local_port: int | None = None, calls: int | None = 1,
                 rate: float | None = None, timeout: float | None = None,
                 trace_messages: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """Build a sipp command line that runs without a terminal.

    Terminal-less: sipp 3.6.1 draws no curses screen when stdout is not a
    tty (ScreenPrinter's headless mode), so we only need `-nostdin` (it would
    otherwise poll stdin for keyboard commands) and files for everything:
    -trace_stat/-stf (counts, dumped every -fd second and at exit),
    -trace_screen/-screen_file (final report), -trace_err/-error_file and
    -trace_msg/-message_file. No -bg: it forks and the parent exits, which
    would lose the exit status.
    `-i local_ip` also skips sipp's UDP-connect probe for its own address.
    trace_messages=False drops -trace_msg (large runs: it logs every message).
    """
    scenario = Path(scenario)
    if not scenario.is_absolute() and not scenario.exists():
        scenario = SCENARIOS_DIR / scenario
    cmd = [sipp, "-sf", str(scenario), "-t", transport, "-i", local_ip,
           "-nostdin",
           "-trace_stat", "-stf", str(log_dir / f"{name}.stat.csv"), "-fd", "1",
           "-trace_screen", "-screen_file", str(log_dir / f"{name}.screen.log"),
           "-trace_err", "-error_file", str(log_dir / f"{name}.errors.log")]
    if trace_messages:
        cmd += ["-trace_msg", "-message_file", str(log_dir / f"{name}.messages.log")]
    if local_port is not None:
        cmd += ["-p", str(local_port)]
    if calls is not None:
        cmd += ["-m", str(calls)]
    if rate is not None:
        cmd += ["-r", f"{rate:g}"]
    if timeout is not None:
        # -timeout_error: a run cut short by the global timeout is a failure.
        cmd += ["-timeout", f"{max(1, int(timeout))}s", "-timeout_error"]
    cmd += list(extra)
    cmd.append(remote)
    return cmd


class SippProcess:
    """A sipp run in the background (e.g. a UAS waiting for calls)."""

    def __init__(self, cmd: list[str], log_dir: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.log_dir = log_dir
        self.name = name
        self._stdout = open(log_dir / f"{name}.stdout.log", "wb")
        self._stderr = open(log_dir / f"{name}.stderr.log", "wb")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=self._stderr,
            cwd=log_dir, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for exit; on timeout, SIGTERM it (sipp then still writes its
        final stats) and return with what it reported."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.terminate()
        return self._result()

    def terminate(self, grace: float = 5.0) -> SippResult:
        """SIGTERM (sipp exits through its normal path, dumping stats), then
        SIGKILL if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self._result()

    def _result(self) -> SippResult:
        for handle in (self._stdout, self._stderr):
            handle.close()
        stats = read_sipp_stats(self.log_dir / f"{self.name}.stat.csv")
        result = SippResult(self.proc.returncode, 0, 0, self.log_dir, self.name,
                            self.cmd, stats)
        result.successful = result.count("SuccessfulCall(C)")
        result.failed = result.count("FailedCall(C)")
        return result


def start_sipp(sipp: str, scenario: str | Path, remote: str, *, log_dir: Path,
               name: str | None = None, env: dict[str, str] | None = None,
               **options) -> SippProcess:
    """Start sipp in the background with terminal-less flags (see sipp_command)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    name = name or f"{Path(scenario).stem}-{uuid.uuid4().hex[:6]}"
    cmd = sipp_command(find_sipp(sipp), scenario, remote, log_dir=log_dir, name=name, **options)
    return SippProcess(cmd, log_dir, name, env)


def run_sipp(sipp: str, scenario: str | Path, remote: str, *, log_dir: Path,
             name: str | None = None, wait: float = 30.0,
             env: dict[str, str] | None = None, **options) -> SippResult:
    """Run sipp to completion (at most `wait` seconds) and return its result."""
    return start_sipp(sipp, scenario, remote, log_dir=log_dir, name=name, env=env,
                      **options).wait(wait)


def read_sipp_stats(stat_file: Path) -> dict[str, str]:
    """The last row of a -trace_stat file as {column: value}; {} if sipp never
    wrote one (e.g. it died on a fatal error before its first dump).

    sipp writes the header and a row at start, one every -fd second and a
    final one on exit (also on SIGTERM), so the last row holds the totals.
    """
    try:
        with open(stat_file, newline="") as handle:
            rows = [row for row in csv.reader(handle, delimiter=";") if row]
    except FileNotFoundError:
        return {}
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1]))


def write_users_csv(path: Path, users: Iterable[str], domain: str = DEFAULT_DOMAIN) -> Path:
    """A SEQUENTIAL -inf file: user;domain per line ([field0];[field1])."""
    lines = ["SEQUENTIAL"] + [f"{user};{domain}" for user in users]
    path.write_text("\n".join(lines) + "\n")
    return path


def place_calls(sut: Kamailio, user: str, count: int = 1, *, sipp: str = "sipp",
                rate: float | None = None, timeout: float = 30,
                log_dir: Path | None = None, call_id: str | None = None) -> CallResult:
    """Call sip:USER@domain `count` times through the SuT, as a third party.

    Runs a plain sipp over UDP (no fdkeeper on this side) with
    scenarios/uac-call.xml and waits for it. The result's `ok` is True when
    every call was answered and hung up cleanly.
    `call_id` is passed as sipp's -cid_str (see uac-register-then-answer.xml:
    a client-mode callee only accepts a Call-ID it already knows).
    """
    log_dir = Path(log_dir) if log_dir else sut.workdir / "calls"
    extra = ["-s", user, "-key", "domain", sut.domain]
    if call_id is not None:
        extra += ["-cid_str", call_id]
    return run_sipp(sipp, "uac-call.xml", sut.address, log_dir=log_dir,
                    name=f"call-{user}-{uuid.uuid4().hex[:6]}", wait=timeout + 10,
                    transport="u1", local_ip=sut.host, calls=count, rate=rate,
                    timeout=timeout, trace_messages=count <= 50, extra=extra)
