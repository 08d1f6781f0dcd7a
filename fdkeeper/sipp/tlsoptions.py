"""The keeper's TLS options for a sipp run: fdkeeper's --tls-* and sipp's own -tls_*.

The keeper speaks TLS to the SuT, so sipp's -tls_cert, -tls_key, -tls_ca, -tls_crl and
-tls_version mean for it what they meant for a TLS-enabled sipp (src/sslsocket.cpp):
the client certificate and key, the CAs to verify the SuT against, the CRL to check, and
the one TLS version to speak. Both spellings may be used; given twice with different
values is a mistake worth one line.

Each file must be a regular file, said here before anything starts. This run resolves the
links in a CA, CRL, certificate or key path (with the user's own view and rights, as sipp
would have opened it), because the keeper, often root's, opens the file it is sent without
following a link and without blocking (statedir.open_named_file). The key log is written with
the secrets of every session, so a link there is refused, here and in the keeper.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.args import SippInvocation, remote_is_name
from fdkeeper.statedir import check_named_file
from fdkeeper.tls import TlsOptions

# TlsOptions field -> (fdkeeper's option, sipp's option), for messages.
_SPELLINGS = {
    "ca": ("--tls-ca", "-tls_ca"),
    "cert": ("--tls-cert", "-tls_cert"),
    "key": ("--tls-key", "-tls_key"),
    "crl": (None, "-tls_crl"),
}


def keeper_tls_options(given: TlsOptions, invocation: SippInvocation) -> TlsOptions:
    """Check the TLS options before anything starts; default the SNI to a remote host name."""
    files = {name: _merged(name, getattr(given, name, None), invocation.tls.get(name)) for name in _SPELLINGS}
    resolved = {name: _readable_file(path, _spelled(name, given)) if path else None for name, path in files.items()}
    if files["key"] and not files["cert"]:
        raise FdkeeperError(
            "fdkeeper: --tls-key (-tls_key) needs --tls-cert (-tls_cert), the client certificate it belongs to"
        )
    if given.insecure:
        print(
            "fdkeeper: warning: --tls-insecure: the SuT's certificate is not verified; anyone on the path can pose as it",
            file=sys.stderr,
            flush=True,
        )
    minimum, maximum = _versions(given.min_version, invocation.tls.get("version"))
    keylog = str(Path(given.keylog).absolute()) if given.keylog else None
    if keylog:
        check_named_file(keylog, "--tls-keylog")  # a link is never followed for a file of secrets
    return TlsOptions(
        ca=resolved["ca"],
        insecure=given.insecure,
        cert=resolved["cert"],
        key=resolved["key"],
        crl=resolved["crl"],
        sni=given.sni or remote_is_name(invocation),
        min_version=minimum,
        max_version=maximum,
        keylog=keylog,
    )


def _readable_file(path: str, option: str) -> str:
    """The file the user named, links resolved here (this run has the user's own view and rights;
    the keeper, which may be root's, follows no link), checked to be a regular file."""
    real = os.path.realpath(path)
    if not os.path.lexists(real):
        raise FdkeeperError(f"fdkeeper: {option} file {path} not found; check the path")
    check_named_file(real, option)
    return real


def _merged(name: str, ours: str | None, sipps: str | None) -> str | None:
    if ours and sipps and os.path.realpath(ours) != os.path.realpath(sipps):
        ours_option, sipp_option = _SPELLINGS[name]
        raise FdkeeperError(
            f"fdkeeper: {ours_option} {ours} and sipp's {sipp_option} {sipps} disagree; give one of them"
        )
    return ours or sipps


def _spelled(name: str, given: TlsOptions) -> str:
    ours_option, sipp_option = _SPELLINGS[name]
    return ours_option if ours_option and getattr(given, name, None) else sipp_option


def _versions(min_version: str | None, sipp_version: str | None) -> tuple[str | None, str | None]:
    """(minimum, maximum) TLS version: sipp's -tls_version X speaks exactly X; 0 negotiates."""
    if sipp_version is None:
        return min_version, None
    try:
        number = float(sipp_version)  # sipp reads it with atof-like get_double
    except ValueError:
        number = -1.0
    if number == 0.0:
        return min_version, None
    if number not in (1.0, 1.1, 1.2, 1.3):
        raise FdkeeperError(
            f"fdkeeper: -tls_version {sipp_version}: use 1.2 or 1.3 (or 0 to negotiate), as sipp takes it"
        )
    if number < 1.2:
        raise FdkeeperError(
            f"fdkeeper: -tls_version {sipp_version}: fdkeeper speaks TLS 1.2 and 1.3 only; use 1.2 or 1.3"
        )
    pinned = f"{number:.1f}"
    if min_version == "1.3" and pinned == "1.2":
        raise FdkeeperError("fdkeeper: --tls-min-version 1.3 and sipp's -tls_version 1.2 disagree; give one of them")
    return pinned, pinned
