"""The embedded default SuT (System under Test): a Kamailio registrar on loopback, and a
Kamailio UDP <-> TCP/TLS converter in front of it.

Used by the project's tests, its benches and `fdkeeper demo`. The SuT's config
(configs/sut.cfg) is built for what fdkeeper has to prove: a user registered over a
TCP connection is reached over THAT connection and no other. The registrar sends calls
to the connection's source ip:port (`fix_nated_register`), and it never opens a
connection towards a user (`set_forward_no_connect`), so a lost connection makes a call
fail loudly instead of being silently re-created.

With `tls=KamailioTls(...)` (certificates from fdkeeper.testbed.pki) an instance also
listens for TLS on a second port, routing TLS users exactly like TCP ones. With
`websocket=True` it listens for SIP over WebSocket (RFC 7118) on a port of its own, and
with TLS for WSS on another (Kamailio's xhttp and websocket modules, Debian package
`kamailio-websocket-modules`): a WebSocket user is reached only over the connection it
registered on, as WebRTC gateways do.
`close_connections()` makes Kamailio itself close TCP/TLS connections (TLS with
close_notify). `KamailioConverter` is a second, stateless Kamailio that turns sipp's
UDP into TCP or TLS towards the SuT (Debian's sipp has no TLS). `PingingKamailio` is the SuT
also pinging every registered contact from a timer, as SBCs do.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fdkeeper.address import format_address
from fdkeeper.testbed import configs, kamcmd
from fdkeeper.testbed.configs import LOG_TAG
from fdkeeper.testbed.kamcmd import KamRow
from fdkeeper.testbed.kamtls import KamailioTls, TlsHandshake, parse_tls_errors, parse_tls_handshakes
from fdkeeper.testbed.net import DEFAULT_DOMAIN, tail, wait_until
from fdkeeper.testbed.process import KamailioProcess, find_program
from fdkeeper.testbed.sipmsg import udp_options

# The user part of the control request close_connections() sends over UDP
# from loopback: `OPTIONS sip:fdkeeper-close-connection@IP:PORT` with the
# connection id in a header. Only answered from one of our own addresses.
CLOSE_CONNECTION_USER = "fdkeeper-close-connection"
_CLOSE_CONNECTION_HEADER = "X-Fdkeeper-Conid"


# The SuT is stateful: tm (loaded before sl, see global.cfg) and its RPCs.
_TM_MODULES = 'loadmodule "tm.so"\nloadmodule "tmx.so"'


def control_route() -> str:
    """The test-control block both configurations start their request_route with."""
    return configs.render("control-route.cfg", user=CLOSE_CONNECTION_USER, header=_CLOSE_CONNECTION_HEADER, tag=LOG_TAG)


class KamailioInstance(KamailioProcess):
    """What the SuT (`Kamailio`) and the converter (`KamailioConverter`) share
    beyond their lifecycle: logs, RPC, and their TCP/TLS connections."""

    # -- logs ----------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def tls_handshakes(self) -> list[TlsHandshake]:
        """TLS handshakes this instance completed, from its log (see
        kamtls.parse_tls_handshakes). A failed one is not listed: see tls_errors()."""
        return parse_tls_handshakes(self.log_text())

    def tls_errors(self) -> list[str]:
        """OpenSSL errors of failed TLS handshakes/reads from the log."""
        return parse_tls_errors(self.log_text())

    # -- RPC -----------------------------------------------------------

    def rpc(self, *args: str, timeout: float = 5.0) -> str:
        """Run one kamcmd command over this instance's ctl socket."""
        if not self.running:
            raise RuntimeError(f"kamailio is not running ({self})")
        cmd = [find_program("kamcmd", "kamailio"), "-s", f"unix:{self.ctl_path}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"kamcmd {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc.stdout

    def tcp_connections(self) -> list[KamRow]:
        """Kamailio's TCP and TLS connections (kamcmd core.tcp_list).

        Keys: id, type ("TCP" or "TLS"), state, local/remote as "ip:port"
        plus local_port and remote_port as ints, timeout, ref_count.
        """
        return kamcmd.tcp_connections(kamcmd.parse_kamcmd(self.rpc("core.tcp_list")))

    def tls_connections(self) -> list[KamRow]:
        """The TLS ones of tcp_connections()."""
        return [c for c in self.tcp_connections() if str(c.get("type")).upper() == "TLS"]

    def close_connections(
        self, conids: Iterable[int] | None = None, *, remote_port: int | None = None, timeout: float = 10.0
    ) -> list[KamRow]:
        """Make Kamailio close TCP/TLS connections itself; return the ones closed.

        All of them by default, or those with an id in `conids`, or the one
        from `remote_port`. For each, a control OPTIONS over loopback UDP
        runs tcpops' tcp_close_connection(id) (Kamailio 5.6.3 has no RPC to
        close a connection): the worker sends CONN_EOF to tcp_main, which
        unhashes the connection and closes its socket. What the peer sees:
        TCP - a FIN (EOF on read; no RST, nothing sent before it); TLS - a
        TLS close_notify alert, then the FIN (tls modparam send_close_notify=1,
        the KamailioTls default; without it just the FIN, which a TLS client
        reads as an unexpected EOF). Measured: the peer reads EOF within a
        few ms, also right after a request. Kamailio never re-opens it (the
        SuT has set_forward_no_connect); a contact registered over it is
        then treated as lost (handle_lost_tcp). Waits until core.tcp_list no
        longer shows the connections. restart() is the heavy alternative.
        """
        wanted = None if conids is None else {int(c) for c in conids}
        targets = [
            c
            for c in self.tcp_connections()
            if (wanted is None or int(c["id"]) in wanted) and (remote_port is None or c["remote_port"] == remote_port)
        ]
        for conn in targets:
            reply = self.udp_request(CLOSE_CONNECTION_USER, [f"{_CLOSE_CONNECTION_HEADER}: {conn['id']}"], wait=2.0)
            if reply is None or not reply.startswith((b"SIP/2.0 200", b"SIP/2.0 404")):
                raise RuntimeError(
                    f"close of connection {conn['id']} not acknowledged: {reply!r}; log:\n{self.log_tail()}"
                )
        ids = {c["id"] for c in targets}
        if ids:
            wait_until(
                lambda: not ids & {c["id"] for c in self.tcp_connections()},
                timeout=timeout,
                interval=0.1,
                what=f"connections {sorted(ids)} to close",
            )
        return targets


class Kamailio(KamailioInstance):
    """The SuT: a Kamailio registrar/proxy on loopback, owned by this process.

    >>> with Kamailio(tmp_path) as sut:
    ...     sut.port, sut.location(), sut.tcp_connections()

    Options beyond the basic ones: `children` (UDP and TCP workers each),
    `tcp_lifetime` (s, idle TCP connections are kept this long),
    `tcp_max_connections`, `ul_timer` (s between usrloc timer runs, which
    drop contacts of lost connections), `handle_lost_tcp` (False: lookup()
    keeps returning a dead contact and the relay fails with 480 instead of
    the lookup failing with 404), `alias_every_request` (True: every request
    over TCP/TLS maps its Via sent-by port onto its connection with
    force_tcp_alias(), as SBCs do, and is logged with its Via, see
    `request_vias()`; a connection holds a few such aliases, beyond them
    the request is dropped, logged as "alias failed", see `alias_failures()`).
    `auth_users={user: password}` makes it a registrar that wants digest credentials
    (configs/auth.cfg): REGISTER is challenged with 401, an INVITE from one of its
    users with 407, and wrong credentials get a 403.
    `tls=KamailioTls(...)` adds a TLS listener on `tls_port` (a second free
    port unless given; `tls_address`) with its own tls.cfg in the work dir.
    TLS users are routed like TCP ones: REGISTER over TLS, calls and
    in-dialog requests only over the registering TLS connection.
    `websocket=True` adds a WS listener on `ws_port` (`ws_address`) and, with
    `tls`, a WSS one on `wss_port` (`wss_address`), free ports unless given.
    The HTTP Upgrade must ask for the subprotocol `sip` (else 400), on
    `ws_path` when one is given (else 404; any path by default). WebSocket
    users are routed like TCP ones: the REGISTER's source connection is what
    lookup() sends to, a dialog's Contact carries its alias. Kamailio pings a
    WebSocket connection idle for `ws_keepalive` s. `websocket_requests()`
    lists what came over WS/WSS with its Via.
    Files in `workdir`: kamailio.cfg, tls.cfg, kamailio.log (appended across
    restarts), kamailio.pid, run/ (runtime dir and ctl socket).
    """

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        domain: str = DEFAULT_DOMAIN,
        *,
        children: int = 2,
        tcp_lifetime: int = 3600,
        tcp_max_connections: int = 4096,
        ul_timer: int = 5,
        handle_lost_tcp: bool = True,
        tls: KamailioTls | None = None,
        tls_port: int | None = None,
        shm_mb: int | None = None,
        alias_every_request: bool = False,
        auth_users: Mapping[str, str] | None = None,
        websocket: bool = False,
        ws_port: int | None = None,
        wss_port: int | None = None,
        ws_path: str | None = None,
        ws_keepalive: int = 180,
    ) -> None:
        super().__init__(
            workdir,
            host,
            port,
            children=children,
            tcp_lifetime=tcp_lifetime,
            tcp_max_connections=tcp_max_connections,
            tls=tls,
            tls_port=tls_port,
            shm_mb=shm_mb,
            websocket=websocket,
            ws_port=ws_port,
            wss_port=wss_port,
            ws_keepalive=ws_keepalive,
        )
        self.ws_path = _checked_ws_path(ws_path)
        self.domain = domain
        self.alias_every_request = alias_every_request
        self.ul_timer = ul_timer
        self.handle_lost_tcp = handle_lost_tcp
        self.auth_users = dict(auth_users) if auth_users is not None else None
        if self.auth_users is not None:
            check_auth_users(self.auth_users)

    def __repr__(self) -> str:
        return (
            super()
            .__repr__()
            .replace(" running", f" {self.domain} running")
            .replace(" stopped", f" {self.domain} stopped")
        )

    @property
    def uri(self) -> str:
        return f"sip:{self.domain}"

    def config_text(self) -> str:
        text = configs.render(
            "sut.cfg",
            domain=self.domain,
            ul_timer=self.ul_timer,
            handle_lost_tcp=int(self.handle_lost_tcp),
            tag=LOG_TAG,
            control_route=control_route(),
            alias_every_request=_ALIAS_EVERY_REQUEST if self.alias_every_request else "",
            auth_route="    route(AUTH);" if self.auth_users is not None else "",
            websocket_request=_WEBSOCKET_REQUEST if self.websocket else "",
            global_section=self.global_config("fdkeeper-sut", early_modules=_TM_MODULES),
        )
        # Appended, as route blocks may come after the request_route that calls them.
        if self.websocket:
            text += self._websocket_routes()
        if self.auth_users is not None:
            text += auth_config(self.auth_users)
        return text

    def _websocket_routes(self) -> str:
        """configs/ws-routes.cfg: the HTTP Upgrade accepted on the WS/WSS ports only."""
        ports = [port for port in (self.ws_port, self.wss_port) if port is not None]
        path_test = ""
        if self.ws_path is not None:
            path_test = (
                f'    if ($hu != "{self.ws_path}") {{\n'
                f'        xlog("L_NOTICE", "{LOG_TAG} WebSocket upgrade on path $hu, not {self.ws_path} - 404\\n");\n'
                '        xhttp_reply("404", "Not Found", "text/plain", "no WebSocket here\\n");\n'
                "        exit;\n"
                "    }"
            )
        return configs.render(
            "ws-routes.cfg",
            port_test=" && ".join(f"$Rp != {port}" for port in ports),
            path_test=path_test,
            tag=LOG_TAG,
        )

    def websocket_requests(self) -> list[dict[str, str]]:
        """With `websocket`: each request that came over WS or WSS, in order, as {method,
        user (From), transport ("WS" or "WSS", as Kamailio received it), source "ip:port",
        via (its top Via, e.g. "SIP/2.0/WSS 127.0.0.1:5070;branch=...")}."""
        return [
            {"method": m, "user": u, "transport": t, "source": src, "via": via}
            for m, u, t, src, via in _WEBSOCKET_REQUEST_LINE.findall(self.log_text())
        ]

    def websocket_connections(self) -> list[KamRow]:
        """The WS and WSS ones of tcp_connections()."""
        return [c for c in self.tcp_connections() if str(c.get("type")).upper() in ("WS", "WSS")]

    def request_vias(self) -> list[dict[str, str]]:
        """With `alias_every_request`: each request a TCP/TLS peer sent, in order, as
        {method, user (From), source "ip:port", sent_by "ip:port" of its top Via}."""
        return [
            {"method": m, "user": u, "source": src, "sent_by": via}
            for m, u, src, via in _REQUEST_VIA.findall(self.log_text())
        ]

    def alias_failures(self) -> int:
        """With `alias_every_request`: how often Kamailio could not alias a Via port onto a
        connection (its per-connection alias limit reached); each such request was dropped."""
        return self.log_text().count(f"{LOG_TAG} alias failed")

    def ping_user(self, user: str, wait: float = 3.0) -> bytes | None:
        """Ping a registered user as an SBC does: an OPTIONS to sip:USER@this SuT, sent over
        UDP from loopback, which the registrar relays over the user's own connection (the
        kept one). Returns the user's response as relayed back, None if none came in time."""
        return udp_options(self.host, self.port, user, wait=wait)

    def location(self, aors: Iterable[str] | None = None) -> list[KamRow]:
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
        return kamcmd.dump_contacts(kamcmd.parse_kamcmd(self.rpc("ul.dump")))

    def _lookup(self, aor: str) -> list[KamRow]:
        try:
            text = self.rpc("ul.lookup", "location", aor)
        except RuntimeError:
            return []  # not registered (or no live contact)
        return kamcmd.lookup_contacts(kamcmd.parse_kamcmd(text))


# A user name or password goes into the config as a Kamailio string literal: keep to
# characters that need no quoting there (and none that end a sipp CSV field).
_AUTH_TEXT = re.compile(r"^[A-Za-z0-9_.+@!%*~^-]+$")


def check_auth_users(users: Mapping[str, str]) -> None:
    """Refuse users or passwords the SuT's config cannot hold, naming the bad one."""
    if not users:
        raise ValueError("auth needs at least one user with a password")
    for user, password in users.items():
        if not _AUTH_TEXT.match(user):
            raise ValueError(f"user name {user!r}: use letters, digits and _.+@!%*~^- only")
        if not _AUTH_TEXT.match(password):
            raise ValueError(f"the password of {user!r}: use letters, digits and _.+@!%*~^- only, not empty")


def auth_config(users: Mapping[str, str]) -> str:
    """configs/auth.cfg with the users' passwords (see Kamailio's `auth_users`)."""
    passwords = "\n".join(f'    $sht(fdk_passwd=>{user}) = "{password}";' for user, password in users.items())
    return configs.render("auth.cfg", passwords=passwords, secret=secrets.token_hex(16), tag=LOG_TAG)


# Kamailio's own text: rendered into sut.cfg after force_rport() when alias_every_request is set.
_ALIAS_EVERY_REQUEST = f"""    # Every request over TCP/TLS aliases its Via port to its connection (RFC 5923 style, as
    # SBCs do): a client that names a new port per request exhausts the connection's aliases,
    # and a request whose port finds no room is dropped.
    if (proto==TCP || proto==TLS) {{
        xlog("L_INFO", "{LOG_TAG} request $rm from $fU source $si:$sp via $hdr(Via)\\n");
        if (!force_tcp_alias()) {{
            xlog("L_ERR", "{LOG_TAG} alias failed for $rm from $fU source $si:$sp: dropped\\n");
            exit;
        }}
    }}"""
_REQUEST_VIA = re.compile(re.escape(LOG_TAG) + r" request (\S+) from (\S*) source (\S+) via SIP/2\.0/\w+ ([^;\s]+)")


# Kamailio's own text: rendered into sut.cfg after force_rport() when websocket is set.
_WEBSOCKET_REQUEST = f"""    # A WebSocket client (nat_uac_test 64: the request came over WS/WSS) is reached only
    # over its connection: REGISTER saves its source as received (fix_nated_register in
    # route[REGISTRAR]), and a dialog's Contact gets the connection's alias, which
    # handle_ruri_alias() turns back into it.
    if (nat_uac_test("64")) {{
        xlog("L_INFO", "{LOG_TAG} websocket request $rm from $fU over $proto source $si:$sp via $hdr(Via)\\n");
        if (!is_method("REGISTER") && is_present_hf("Contact")) {{
            add_contact_alias();
        }}
    }}"""
_WEBSOCKET_REQUEST_LINE = re.compile(
    re.escape(LOG_TAG) + r" websocket request (\S+) from (\S*) over (\S+) source (\S+) via ([^\r\n]*)"
)
_WS_PATH = re.compile(r"^/[\x21-\x7e]{0,200}$")


def _checked_ws_path(path: str | None) -> str | None:
    """A path the config can hold in a string literal, or ValueError."""
    if path is not None and (not _WS_PATH.match(path) or '"' in path or "\\" in path):
        raise ValueError(f"ws_path {path!r}: a path such as /ws (printable, no quote or backslash)")
    return path


# The pings PingingKamailio sends (usrloc's debug line, then the request line) and the replies it
# matched to them (ka_logmsg in contact-pings.cfg), by the pinged user.
_PING_SENT = re.compile(r"keepalive request \(len: \d+\) \[\[\s*\n\w+ sips?:([^@;>\s]+)@")
_PING_ANSWERED = re.compile(re.escape(LOG_TAG) + r" ping answered by (\S+)")


class PingingKamailio(Kamailio):
    """The SuT pinging every registered contact as an SBC does, from a timer: an OPTIONS
    over the contact's own connection on every usrloc timer run (every `ul_timer` s; see
    configs/contact-pings.cfg). A contact that answers no ping for `ping_timeout` s is
    expired. `contact_pings()` counts what was sent and answered, from the log."""

    def __init__(self, workdir: Path, *, ping_timeout: int = 30, **options: Any) -> None:  # options: Kamailio's
        super().__init__(workdir, **options)
        self.ping_timeout = ping_timeout

    def config_text(self) -> str:
        # Appended: its modparams need usrloc, which sut.cfg loads after the global section.
        return super().config_text() + configs.render(
            "contact-pings.cfg", domain=self.domain, ka_timeout=self.ping_timeout, tag=LOG_TAG
        )

    def contact_pings(self) -> dict[str, dict[str, int]]:
        """{user: {"sent": pings sent to the user's contact, "answered": replies matched to them}}."""
        text = self.log_text()
        counts: dict[str, dict[str, int]] = {}
        for key, pattern in (("sent", _PING_SENT), ("answered", _PING_ANSWERED)):
            for user in pattern.findall(text):
                counts.setdefault(user, {"sent": 0, "answered": 0})[key] += 1
        return counts


class KamailioConverter(KamailioInstance):
    """A stateless UDP <-> TCP/TLS converter in front of a SuT (for benches).

    Listens on UDP (and TCP, same port) at host:port; every request that
    sipp sends over UDP is forwarded statelessly to the SuT at
    sut_host:sut_port over `transport` ("tcp" or "tls"; TLS needs
    `tls=KamailioTls(...)`, e.g. KamailioTls.client(pki), and listens on
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

    def __init__(
        self,
        workdir: Path,
        sut_host: str,
        sut_port: int,
        transport: str = "tcp",
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        sipp_address: str | None = None,
        tls: KamailioTls | None = None,
        tls_port: int | None = None,
        children: int = 2,
        tcp_lifetime: int = 3600,
        tcp_max_connections: int = 4096,
    ) -> None:
        transport = transport.lower()
        if transport not in ("tcp", "tls"):
            raise ValueError(f"transport must be 'tcp' or 'tls', not {transport!r}")
        if transport == "tls" and tls is None:
            raise ValueError("a TLS converter needs tls=KamailioTls(...) (e.g. KamailioTls.client(pki))")
        super().__init__(
            workdir,
            host,
            port,
            children=children,
            tcp_lifetime=tcp_lifetime,
            tcp_max_connections=tcp_max_connections,
            tls=tls,
            tls_port=tls_port,
        )
        self.sut_host = sut_host
        self.sut_port = sut_port
        self.transport = transport
        self.sipp_address = sipp_address

    @classmethod
    def for_sut(cls, workdir: Path, sut: Kamailio, transport: str = "tcp", **options: Any) -> KamailioConverter:
        """A converter towards `sut`'s TCP port or (transport="tls") TLS port; options: __init__'s."""
        port = sut.tls_port if transport == "tls" else sut.port
        if port is None:
            raise ValueError(f"{sut} has no TLS listener")
        return cls(workdir, sut.host, port, transport, **options)

    @property
    def sut_uri(self) -> str:
        return f"sip:{format_address((self.sut_host, self.sut_port))};transport={self.transport}"

    @property
    def send_socket(self) -> str:
        """The converter's own socket towards the SuT, proto:ip:port: the
        source address of its one connection to the SuT."""
        port = self.tls_port if self.transport == "tls" else self.port
        if port is None:  # not met: a TLS converter is made with tls=, so it listens for TLS
            raise RuntimeError(f"{self} has no TLS listener")
        return f"{self.transport}:{format_address((self.host, port))}"

    def config_text(self) -> str:
        if self.sipp_address:
            to_sipp = f'$du = "sip:{self.sipp_address};transport=udp";'
        else:
            to_sipp = "$du = $null;  # by R-URI: the Contact that sipp registered"
        return configs.render(
            "converter.cfg",
            transport_upper=self.transport.upper(),
            sut_uri=self.sut_uri,
            to_sipp=to_sipp,
            send_socket=self.send_socket,
            tag=LOG_TAG,
            control_route=control_route(),
            global_section=self.global_config("fdkeeper-converter", early_modules=""),
        )
