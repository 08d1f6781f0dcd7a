"""Human-readable views of the keeper's status (the CLI and the demo print these)."""

from __future__ import annotations

import fnmatch


def select_connections(
    connections: list[dict],
    *,
    aor: str | None = None,
    state: str | None = None,
    remote: str | None = None,
    transport: str | None = None,
) -> list[dict]:
    """The connections matching every filter given; ``aor`` is a shell-style pattern."""
    return [
        c
        for c in connections
        if (aor is None or fnmatch.fnmatchcase(c.get("aor") or "", aor))
        and (state is None or c["state"] == state)
        and (remote is None or c["remote"] == remote)
        and (transport is None or c["transport"] == transport)
    ]


def format_status(status: dict) -> str:
    keeper = status["keeper"]
    lines = [f"keeper pid {keeper['pid']}, up {_duration(keeper['uptime'])}, directory {keeper['directory']}"]
    connections = status["connections"]
    if not connections:
        lines.append("no kept connections (a client scenario run through 'fdkeeper sipp' opens one)")
        return "\n".join(lines)
    header = ("ID", "TRANSPORT", "LOCAL", "REMOTE", "AOR", "STATE", "HOLDER", "HANDOFF", "AGE", "LEASES", "QUEUED")
    rows = [
        (
            str(c["id"]),
            c["transport"],
            c["local"],
            c["remote"],
            c.get("aor") or "-",
            c["state"] + (f" ({c['closed_reason']})" if c["closed_reason"] else ""),
            str(c["holder_pid"] or "-"),
            f"{c['mode']}/{c['transfer']}" if c.get("mode") else "-",
            _duration(c["age"]),
            str(c["leases"]),
            str(c["queued_bytes"]),
        )
        for c in connections
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append(_row(header, widths))
    for row, connection in zip(rows, connections):
        lines.append(_row(row, widths))
        if connection.get("tls"):
            lines.append(f"{'':{widths[0]}}  {_tls_line(connection['tls'])}")
    return "\n".join(lines)


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()


def _tls_line(tls: dict) -> str:
    """Protocol, cipher, peer certificate subject and SNI of a TLS connection."""
    verified = "verified" if tls["verified"] else "NOT verified (--tls-insecure)"
    sni = tls["sni"] or "none"
    return f"{tls['version']} {tls['cipher']}, peer {tls['peer_subject'] or '?'} ({verified}), SNI {sni}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
