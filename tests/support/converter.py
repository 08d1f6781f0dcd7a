"""The converter (`fdkeeper convert`) as the tests drive it: a converter process started for a
test and read through its control socket, sipp registering and answering through it, and a
stand-in socket for unit tests that feed the Converter directly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fdkeeper import testbed
from fdkeeper.convert import control_request
from fdkeeper.protocol import ReceivedJson

USER = "alice"


class RunningConverter:
    """A `fdkeeper convert` process in ``workdir``, started and answering STATUS; its log is
    ``workdir``/convert.log."""

    def __init__(self, workdir: Path, sut_address: str, transport: str, sipp_port: int, *extra: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.control = workdir / "convert.sock"
        self.log = workdir / "convert.log"
        self.sipp_port = sipp_port
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fdkeeper",
                "convert",
                "--listen",
                "127.0.0.1:0",
                "--sut",
                sut_address,
                "--transport",
                transport,
                "--sipp-address",
                f"127.0.0.1:{sipp_port}",
                "--control",
                str(self.control),
                *extra,
            ],
            stderr=open(self.log, "wb"),  # noqa: SIM115 - the child writes it
            start_new_session=True,
        )
        testbed.wait_until(lambda: self._status() or self.process.poll() is not None, 10, what="the converter")
        assert self.process.poll() is None, self.log.read_text()
        self.listen = self.status()["listen"]

    def _status(self) -> ReceivedJson | None:
        try:
            return self.status()
        except OSError:
            return None

    def status(self) -> ReceivedJson:
        return control_request(self.control, "STATUS")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def register(
    sipp_path: str,
    converter: RunningConverter,
    kamailio: testbed.Kamailio,
    tmp_path: Path,
    name: str = "register",
    user: str = USER,
) -> testbed.SippResult:
    """Register ``user`` at the SuT with sipp over UDP through the converter; the run must pass."""
    users = testbed.write_users_csv(tmp_path / f"{name}.csv", [user], kamailio.domain)
    result = testbed.run_sipp(
        sipp_path,
        "uac-register.xml",
        converter.listen,
        log_dir=tmp_path / "logs",
        name=name,
        transport="u1",
        calls=1,
        timeout=10,
        extra=["-inf", str(users)],
    )
    assert result.ok, result.summary()
    return result


def answer_calls(
    sipp_path: str,
    converter: RunningConverter,
    kamailio: testbed.Kamailio,
    tmp_path: Path,
    count: int = 2,
    name: str = "answer",
    user: str = USER,
) -> tuple[testbed.CallResult, testbed.SippResult]:
    """sipp answers ``count`` calls placed to ``user`` through the SuT, over UDP through the
    converter; every call must succeed."""
    answer = testbed.start_sipp(
        sipp_path,
        "uas-answer.xml",
        converter.listen,
        log_dir=tmp_path / "logs",
        name=name,
        transport="u1",
        local_port=converter.sipp_port,
        calls=count,
        timeout=20,
    )
    caller = testbed.place_calls(kamailio, user, count, sipp=sipp_path, timeout=15, log_dir=tmp_path / "logs")
    answered = answer.wait(25)
    assert caller.ok and caller.successful == count, caller.summary()
    assert answered.ok and answered.successful == count, answered.summary()
    return caller, answered


class FakeSock:
    """A socket stand-in for a unit-level Link: the Converter only reads its descriptor number."""

    def fileno(self) -> int:
        return 99
