"""Human-readable views of the keeper's status (the CLI and the demo print these).

Every cell is printed through escape_controls: an AoR (or a reason, a certificate subject)
holding a CR or LF must not split a row or forge one.
"""

from __future__ import annotations

from fdkeeper.protocol import ReceivedJson
from fdkeeper.textsafe import escape_controls


def format_status(status: ReceivedJson) -> str:
    keeper = status["keeper"]
    lines = [
        escape_controls(
            f"keeper pid {keeper['pid']}, up {_duration(keeper['uptime'])}, directory {keeper['directory']}"
        )
    ]
    connections = status["connections"]
    if not connections:
        lines.append("no kept connections (a client scenario run through 'fdkeeper sipp' opens one)")
        return "\n".join(lines)
    header = (
        "ID",
        "TRANSPORT",
        "LOCAL",
        "REMOTE",
        "IDENTITY",
        "AOR",
        "STATE",
        "HOLDER",
        "HANDOFF",
        "AGE",
        "LEASES",
        "QUEUED",
    )
    rows = [
        tuple(
            escape_controls(cell)
            for cell in (
                str(c["id"]),
                c["transport"],
                c["local"],
                c["remote"],
                c.get("identity") or ("per user" if c.get("aor") else "shared"),  # -i/-p; AOR; no -i/-p
                c.get("aor") or "-",
                c["state"] + (f" ({c['closed_reason']})" if c["closed_reason"] else ""),
                str(c["holder_pid"] or "-"),
                f"{c['mode']}/{c['transfer']}" if c.get("mode") else "-",
                _duration(c["age"]),
                str(c["leases"]),
                str(c["queued_bytes"]),
            )
        )
        for c in connections
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append(_row(header, widths))
    for row, connection in zip(rows, connections, strict=False):
        lines.append(_row(row, widths))
        if connection.get("tls"):
            lines.append(f"{'':{widths[0]}}  {escape_controls(_tls_line(connection['tls']))}")
        if connection.get("websocket"):
            lines.append(f"{'':{widths[0]}}  {escape_controls(_websocket_line(connection['websocket']))}")
    return "\n".join(lines)


def format_converter(status: ReceivedJson) -> str:
    """One `--mode udp` converter: its link, attached runs, queue, drops."""
    counters = status.get("counters", {})
    links = ", ".join(
        f"{link['local']}->{link['remote']}/{link['transport']} {link['state']}" for link in status.get("links", [])
    )
    attached = ", ".join(status.get("attached", [])) or "none"
    return escape_controls(
        f"converter pid {status.get('pid')} udp:{status.get('listen')} {links}; runs attached: {attached}; "
        f"queued {status.get('queued', 0)}; resent {counters.get('udp_retransmissions', 0)}; "
        f"dropped from strangers {counters.get('udp_dropped_unattached', 0)}"
    )


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=False)).rstrip()


def _tls_line(tls: ReceivedJson) -> str:
    """Protocol, cipher, peer certificate subject and SNI of a TLS connection."""
    verified = "verified" if tls["verified"] else "NOT verified (--tls-insecure)"
    sni = tls["sni"] or "none"
    return f"{tls['version']} {tls['cipher']}, peer {tls['peer_subject'] or '?'} ({verified}), SNI {sni}"


def _websocket_line(websocket: ReceivedJson) -> str:
    """Path, subprotocol, the server's status line and headers of a WebSocket (ws, wss) connection."""
    headers = "; ".join(f"{name}: {value}" for name, value in websocket.get("server_headers") or [])
    line = f"WebSocket {websocket['path']}, protocol {websocket['protocol']}, {websocket['status']}"
    line += f", server headers: {headers}" if headers else ""
    line += f", pings answered {websocket.get('pings_answered', 0)}"
    return line + (f", closed: {websocket['close']}" if websocket.get("close") else "")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
