"""The modes with SIP over WebSocket (ws, wss): the keeper speaks WebSocket and leases a socketpair
end, as for TLS, so preload and ptrace pass the transport through; the UDP converter cannot speak
WebSocket and refuses in one line naming the modes that can. No processes."""

from __future__ import annotations

from pathlib import Path

import pytest

import fdkeeper.modes.ptrace.services as services
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes import MODES, HandoffRequest, RunNeeds, choose_mode
from fdkeeper.modes.preload import PreloadMode
from fdkeeper.modes.ptrace.services import Services


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_udp_mode_refuses_websocket_naming_preload_and_ptrace(transport):
    needs = RunNeeds(role="client", transport=transport)
    assert MODES["udp"].cannot_do(needs) == "keep WebSocket connections (--ws)"
    assert MODES["preload"].cannot_do(needs) is None and MODES["ptrace"].cannot_do(needs) is None
    with pytest.raises(FdkeeperError) as error:
        choose_mode("udp", Path("/bin/true"), needs)
    assert str(error.value).startswith(
        "fdkeeper: --mode udp cannot keep WebSocket connections (--ws); use --mode preload"
    )
    assert "--mode ptrace" in str(error.value) and "\n" not in str(error.value)


def test_websocket_needs():
    assert RunNeeds(role="client", transport="wss").tls and RunNeeds(role="client", transport="wss").websocket
    assert RunNeeds(role="client", transport="ws").websocket and not RunNeeds(role="client", transport="ws").tls
    assert not RunNeeds(role="client", transport="tls").websocket


def request(transport: str, tmp_path: Path) -> HandoffRequest:
    return HandoffRequest(
        program=Path("/usr/bin/sipp"),
        args=["-t", "t1"],
        role="client",
        control_socket=tmp_path / "control.sock",
        remote=("127.0.0.1", 8443),
        transport=transport,
    )


def test_preload_tells_the_shim_the_transport(tmp_path):
    handoff = PreloadMode().prepare(request("wss", tmp_path))
    assert handoff.env["FDKEEPER_TRANSPORT"] == "wss"


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_ptrace_leases_with_the_runs_transport(monkeypatch, tmp_path, transport):
    leases: list[dict[str, object]] = []

    class RecordingKeeper:
        """RunClient's lease_connections, recording the fields of each lease."""

        def __init__(self, directory: Path) -> None:
            self.directory = directory

        def lease_connections(self, **fields: object) -> str:
            leases.append(fields)
            return "leased"

    monkeypatch.setattr(services, "RunClient", RecordingKeeper)
    traced = Services(tracer=None, request=request(transport, tmp_path), transfer="scm")  # type: ignore[arg-type]
    assert traced.lease(4242, role="client", remote=("127.0.0.1", 8443)) == "leased"
    [fields] = leases
    assert fields["transport"] == transport and fields["for_pid"] == 4242 and fields["mode"] == "ptrace"
    # A per-user lease of a per-call run is fdkeeper's own: the same request run after run, which
    # the keeper answers by its repeat path.
    assert traced.lease(4242, for_program=False, role="client", aor="sip:alice@x") == "leased"
    assert "for_pid" not in leases[1] and leases[1]["aor"] == "sip:alice@x" and leases[1]["mode"] == "ptrace"
