"""The embedded System under Test: a real Kamailio on loopback, its test PKI and sipp helpers.

Used by `fdkeeper demo`, the test suite and the benches. Modules, one concern each:

- net: free_port, bind_fresh_port, wait_until (the one wait helper), DEFAULT_DOMAIN;
- configs: the Kamailio configurations (template files) and their rendering;
- process: a Kamailio process we own (files, start, stop, find_program);
- kamailio: the SuT `Kamailio` and the `KamailioConverter`, with their queries;
- kamtls: `KamailioTls`, the Kamailio side of TLS (tls.cfg, handshakes in the log);
- kamcmd: reading kamcmd output (contacts, connections);
- sipmsg: hand-made SIP (options_request, read_sip_message);
- sipp: running sipp without a terminal (run_sipp, start_sipp, place_calls...);
- pki: throw-away certificates (make_test_pki, TestPki).
"""

from fdkeeper.testbed.configs import LOG_TAG
from fdkeeper.testbed.kamailio import (
    CLOSE_CONNECTION_USER,
    Kamailio,
    KamailioConverter,
    KamailioInstance,
)
from fdkeeper.testbed.kamcmd import parse_kamcmd, parse_sip_target
from fdkeeper.testbed.kamtls import KamailioTls
from fdkeeper.testbed.net import DEFAULT_DOMAIN, bind_fresh_port, free_port, wait_until
from fdkeeper.testbed.pki import TestPki, make_test_pki
from fdkeeper.testbed.sipmsg import options_request, read_sip_message
from fdkeeper.testbed.sipp import (
    CALLER,
    SCENARIOS_DIR,
    SIPP_EXIT_FAILED,
    SIPP_EXIT_OK,
    CallResult,
    SippProcess,
    SippResult,
    fdkeeper_command,
    find_sipp,
    place_calls,
    read_sipp_stats,
    read_users_passwords,
    run_sipp,
    sipp_build,
    sipp_command,
    start_sipp,
    write_users_csv,
)

__all__ = [
    "CALLER",
    "CLOSE_CONNECTION_USER",
    "DEFAULT_DOMAIN",
    "LOG_TAG",
    "SCENARIOS_DIR",
    "SIPP_EXIT_FAILED",
    "SIPP_EXIT_OK",
    "CallResult",
    "Kamailio",
    "KamailioConverter",
    "KamailioInstance",
    "KamailioTls",
    "SippProcess",
    "SippResult",
    "TestPki",
    "bind_fresh_port",
    "fdkeeper_command",
    "find_sipp",
    "free_port",
    "make_test_pki",
    "options_request",
    "parse_kamcmd",
    "parse_sip_target",
    "place_calls",
    "read_sip_message",
    "read_sipp_stats",
    "read_users_passwords",
    "run_sipp",
    "sipp_build",
    "sipp_command",
    "start_sipp",
    "wait_until",
    "write_users_csv",
]
