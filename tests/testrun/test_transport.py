"""A test file's `transport: ws` and `wss` (fdkeeper.testrun.transport): read and checked
before anything runs, the stream sipp steps given `fdkeeper sipp --ws`, the SuT's variables
known; and, with a real Kamailio, the embedded SuT started with the listeners they name.
A whole test over WebSocket with real sipp: docs/examples' WebSocket file (test_examples)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdkeeper.testrun.model import TestFileError, load_test
from fdkeeper.testrun.sut import sut_variables
from fdkeeper.testrun.sutspec import EmbeddedSut
from fdkeeper.testrun.transport import step_options


def load(tmp_path: Path, transport: str, steps: str, sut: str = "embedded"):
    path = tmp_path / "t.yaml"
    path.write_text(f"sut: {sut}\ntransport: {transport}\nsteps:\n{steps}")
    return load_test(path)


def refused(tmp_path: Path, transport: str, steps: str, sut: str = "embedded") -> str:
    with pytest.raises(TestFileError) as error:
        load(tmp_path, transport, steps, sut)
    assert "\n" not in str(error.value)
    return str(error.value)


STEPS = """  - {name: register, sipp: "-sf x.xml -t %s -m 1 ${%s}"}
  - {name: call, sipp: "-sf c.xml -t u1 -m 1 ${sut}"}
  - {name: list, command: "fdkeeper status"}
"""


@pytest.mark.parametrize(("transport", "sipp", "address"), [("ws", "t1", "sut_ws"), ("wss", "l1", "sut_wss")])
def test_websocket_tests_run_their_stream_steps_with_ws(tmp_path, transport, sipp, address):
    spec = load(tmp_path, transport, STEPS % (sipp, address))
    register, call, listing = spec.steps
    assert register.options == ["--ws"]  # fdkeeper sipp --ws -t t1 (WS) / -t l1 (WSS)
    assert call.options == [] and listing.options == []  # the caller over UDP, a command: as written


def test_the_other_kind_of_stream_is_refused_naming_the_step(tmp_path):
    said = refused(tmp_path, "ws", STEPS % ("l1", "sut_ws"))
    assert "step 'register': field 'sipp': -t l1 in a test with transport ws" in said and "transport wss" in said
    said = refused(tmp_path, "wss", STEPS % ("tn", "sut_wss"))
    assert "-t tn in a test with transport wss (WebSocket over TLS): use -t l1 or ln" in said


def test_each_transport_knows_its_own_variables(tmp_path):
    assert "unknown variable ${sut_wss}" in refused(tmp_path, "ws", STEPS % ("t1", "sut_wss"))
    assert "unknown variable ${sut_ws}" in refused(tmp_path, "tls", STEPS % ("l1", "sut_ws"))
    wss = "  - {name: r, sipp: '-t l1 ${sut_wss} ${sut_ws} ${sut_tls}', options: [--tls-ca, '${tls_ca}']}\n"
    assert load(tmp_path, "wss", wss).steps[0].options == ["--ws", "--tls-ca", "${tls_ca}"]
    assert "vars.sut_ws': this name is set by fdkeeper run" in refused(
        tmp_path, "ws", STEPS % ("t1", "sut_ws") + "vars: {sut_ws: x}\n"
    )


def test_websocket_is_for_the_embedded_sut_only(tmp_path):
    said = refused(tmp_path, "wss", STEPS % ("l1", "sut"), sut="127.0.0.1:5060")
    assert "field 'transport': only an embedded SuT ('sut: embedded') is started with WSS" in said


def test_step_options_as_written_when_ws_is_given_or_t_is_a_variable():
    assert step_options("ws", ["-t", "t1"], ["--ws", "--ws-path", "/sip"]) == ["--ws", "--ws-path", "/sip"]
    assert step_options("ws", ["-t", "${kind}"], []) == []
    assert step_options("tcp", ["-t", "t1"], []) == []
    assert step_options("wss", ["-t", "ln", "-t", "l1"], ["--tls-sni", "x"]) == ["--ws", "--tls-sni", "x"]


def test_the_embedded_sut_listens_as_the_transport_says(tmp_path):
    with sut_variables(EmbeddedSut(), "ws", tmp_path / "ws", tmp_path) as values:
        assert "sut_ws" in values and not {"sut_wss", "sut_tls", "tls_ca"} & set(values)
    with sut_variables(EmbeddedSut(), "wss", tmp_path / "wss", tmp_path) as values:
        assert {"sut_ws", "sut_wss", "sut_tls", "tls_ca", "tls_sni"} <= set(values)
        assert len({values["sut"], values["sut_tls"], values["sut_ws"], values["sut_wss"]}) == 4
