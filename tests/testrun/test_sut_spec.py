"""The `sut:` field of a test file (pure logic: nothing is started here).

Each form reads into its sutspec class; each mistake is one line naming the file and the
field. What the forms do with a real Kamailio and sipp: test_own_sut.py, and
tests/e2e/test_e2e_auth.py for the embedded SuT with digest auth.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fdkeeper.testbed import Kamailio, read_users_passwords, write_users_csv
from fdkeeper.testrun.model import TestFileError, load_test
from fdkeeper.testrun.sut import kamailio_listeners
from fdkeeper.testrun.sutspec import AddressSut, EmbeddedSut, Readiness, StartedSut

STEPS = "steps:\n  - name: one\n    command: 'true'\n"


def load(tmp_path: Path, sut: str) -> object:
    path = tmp_path / "t.yaml"
    path.write_text(f"sut: {sut}\n{STEPS}")
    return load_test(path).sut


def refused(tmp_path: Path, sut: str) -> str:
    with pytest.raises(TestFileError) as error:
        load(tmp_path, sut)
    return str(error.value)


def test_the_existing_forms_still_read(tmp_path):
    assert load(tmp_path, "embedded") == EmbeddedSut()
    assert load(tmp_path, "127.0.0.1:5060") == AddressSut("127.0.0.1:5060")
    assert load(tmp_path, "{address: 127.0.0.1:5060, domain: example.org}") == AddressSut(
        "127.0.0.1:5060", "example.org"
    )


def test_an_embedded_sut_with_auth_names_its_users_file(tmp_path):
    write_users_csv(tmp_path / "users.csv", ["alice"], passwords={"alice": "secret"})
    assert load(tmp_path, "{embedded: {auth: true, users: users.csv}}") == EmbeddedSut(True, tmp_path / "users.csv")
    assert "field 'sut.embedded.users': auth and users go together" in refused(tmp_path, "{embedded: {auth: true}}")
    assert "no such file" in refused(tmp_path, "{embedded: {auth: true, users: nope.csv}}")
    assert "field 'sut.embedded.auth': expected true or false" in refused(tmp_path, "{embedded: {auth: yes please}}")


def test_a_kamailio_sut_reads_its_config_relative_to_the_test_file(tmp_path):
    (tmp_path / "my.cfg").write_text("listen=tcp:127.0.0.1:${sut_port}\n")
    sut = load(tmp_path, "{kamailio: my.cfg, timeout: 5}")
    assert sut == StartedSut("kamailio", tmp_path, config=tmp_path / "my.cfg", timeout=5.0)
    (tmp_path / "my.cfg").write_text("listen=tcp:127.0.0.1:${port}\n")
    assert "field 'sut.kamailio': unknown variable ${port}" in refused(tmp_path, "{kamailio: my.cfg}")
    assert "field 'sut.kamailio': no such file" in refused(tmp_path, "{kamailio: other.cfg}")


def test_a_command_sut_needs_a_readiness(tmp_path):
    sut = load(tmp_path, "{command: './srv --port ${sut_port}', ready: 'tcp:${sut_port}'}")
    assert isinstance(sut, StartedSut)
    assert sut.command == ("./srv", "--port", "${sut_port}") and sut.ready == Readiness("tcp", "${sut_port}")
    assert "field 'sut.ready': expected 'tcp:PORT'" in refused(tmp_path, "{command: ./srv}")
    assert "field 'sut.ready': expected 'tcp:PORT'" in refused(tmp_path, "{command: ./srv, ready: 'udp:5060'}")
    assert "not a regular expression" in refused(tmp_path, "{command: ./srv, ready: 'log: (', address: 1.2.3.4:5}")
    assert "field 'sut.address'" in refused(tmp_path, "{command: ./srv, ready: 'log: up'}")
    assert "field 'sut.timeout'" in refused(tmp_path, "{command: ./srv, ready: 'tcp:5', timeout: -1}")


def test_mistakes_in_sut_are_one_line_naming_the_field(tmp_path):
    assert "field 'sut': expected one of embedded, kamailio, command, address" in refused(
        tmp_path, "{command: x, kamailio: y.cfg}"
    )
    assert "field 'sut.port': unknown field" in refused(tmp_path, "{command: x, ready: 'tcp:1', port: 1}")
    assert "field 'sut': expected 'embedded' or HOST:PORT" in refused(tmp_path, "nowhere")


def test_tls_is_only_for_the_embedded_sut(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(f"sut: {{embedded: {{}}}}\ntransport: tls\n{STEPS}")
    assert load_test(path).sut == EmbeddedSut()
    path.write_text(f"sut: {{command: x, ready: 'tcp:5'}}\ntransport: tls\n{STEPS}")
    with pytest.raises(TestFileError, match="field 'transport'"):
        load_test(path)


def test_users_csv_with_passwords_round_trips(tmp_path):
    path = write_users_csv(tmp_path / "u.csv", ["alice", "bob"], passwords={"alice": "a1", "bob": "b2"})
    assert read_users_passwords(path) == {"alice": "a1", "bob": "b2"}
    path.write_text("SEQUENTIAL\nalice;fdkeeper.test\n")
    with pytest.raises(ValueError, match="line 2: expected user;domain;password"):
        read_users_passwords(path)


def test_the_auth_config_refuses_what_kamailio_could_not_quote(tmp_path):
    with pytest.raises(ValueError, match="password of 'alice'"):
        Kamailio(tmp_path, auth_users={"alice": 'se"cret'})
    text = Kamailio(tmp_path, auth_users={"alice": "secret"}).config_text()
    assert "route(AUTH);" in text and '$sht(fdk_passwd=>alice) = "secret";' in text
    assert "route(AUTH);" not in Kamailio(tmp_path).config_text()


def test_listeners_of_a_kamailio_config():
    config = "listen=udp:127.0.0.1:5060\nlisten = tcp:127.0.0.1:5061\n#listen=tcp:1.2.3.4:9\nlisten=[::1]:5062\n"
    assert kamailio_listeners(config) == [("udp", "127.0.0.1", 5060), ("tcp", "127.0.0.1", 5061), ("any", "::1", 5062)]
