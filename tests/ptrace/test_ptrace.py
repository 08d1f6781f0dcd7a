"""The ptrace handoff mode against the real Kamailio: Debian's sipp and small static programs.

Kamailio reaches a registered user only over the connection the REGISTER came in on, so a
call is answered only if the kept connection really moved into the answering program.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import HandoffRequest
from fdkeeper.modes.ptrace import PtraceMode
from fdkeeper.modes.ptrace.epoll import EPOLL_CTL_DEL, EPOLL_CTL_MOD, Registrations, add_from_outside
from fdkeeper.modes.ptrace.seccomp import percall_filter
from fdkeeper.modes.ptrace.session import Session
from fdkeeper.modes.ptrace.tracer import Tracer
from tests.support.shim import compile_program

pytestmark = pytest.mark.skipif(
    PtraceMode()._static_reason(Path(sys.executable).resolve()) is not None, reason="ptrace mode cannot run here"
)

USER = "alice"
SOURCES = Path(__file__).resolve().parent


@pytest.fixture
def users(tmp_path, kamailio):
    return testbed.write_users_csv(tmp_path / "users.csv", [USER], kamailio.domain)


def kept(keeper_dir) -> list[dict]:
    try:
        return KeeperClient(keeper_dir).status()["connections"]
    except FdkeeperError:
        return []


def sipp_run(sipp_path, kamailio, keeper_dir, tmp_path, name, scenario, transfer, options=(), **sipp_options):
    env_options = ("--mode", "ptrace", *options)
    os.environ["FDKEEPER_TRANSFER"] = transfer
    try:
        return start_through_fdkeeper(
            sipp_path,
            scenario,
            kamailio.address,
            directory=keeper_dir,
            log_dir=tmp_path / "logs",
            name=name,
            options=env_options,
            transport="t1",
            **sipp_options,
        )
    finally:
        del os.environ["FDKEEPER_TRANSFER"]


def call(kamailio, sipp_path, tmp_path, count=1):
    return testbed.place_calls(kamailio, USER, count, sipp=sipp_path, timeout=15, log_dir=tmp_path / "logs")


@pytest.mark.parametrize("transfer", ["scm", "pidfd"])
def test_sipp_register_then_answer_in_ptrace_mode(sipp_path, kamailio, keeper_dir, tmp_path, users, transfer):
    register = sipp_run(
        sipp_path,
        kamailio,
        keeper_dir,
        tmp_path,
        "register",
        "uac-register.xml",
        transfer,
        calls=1,
        timeout=15,
        extra=["-inf", str(users)],
    ).wait(30)
    assert register.ok, register.summary()
    [connection] = kept(keeper_dir)
    assert connection["state"] == "idle"

    answer = sipp_run(
        sipp_path,
        kamailio,
        keeper_dir,
        tmp_path,
        "answer",
        "uas-answer.xml",
        transfer,
        calls=2,
        timeout=30,
        local_port=testbed.free_port(),
    )
    caller = call(kamailio, sipp_path, tmp_path, count=2)
    answered = answer.wait(30)
    assert caller.ok and caller.successful == 2, caller.summary()
    assert answered.ok and answered.successful == 2, answered.summary()
    assert len(kamailio.tcp_connections()) == 1  # the same connection all along
    [connection] = kept(keeper_dir)
    assert connection["leases"] == 2 and connection["state"] == "idle"


# ------------------------------------------------------------------ static agents through exec


@pytest.fixture(scope="session")
def sipagent(tmp_path_factory) -> str:
    """tests/ptrace/sipagent.c linked statically: a program LD_PRELOAD cannot reach."""
    if not Path("/usr/lib/x86_64-linux-gnu/libc.a").exists():
        pytest.fail("glibc's static library is missing: apt-get install libc6-dev", pytrace=False)
    binary = tmp_path_factory.mktemp("sipagent") / "sipagent"
    compile_program(SOURCES / "sipagent.c", binary, ["-static"])  # the flags (and -Werror) of every test program
    return str(binary)


def exec_agent(keeper_dir, command, *, role="client", sut_address=None, transfer="scm", transport="tcp", mode="ptrace"):
    """`fdkeeper exec` (agent.run_exec) in a child Python, as the command line would run it."""
    code = (
        "import sys\n"
        "from fdkeeper.errors import FdkeeperError\n"
        "from fdkeeper.agent import ExecOptions, run_exec\n"
        f"options = ExecOptions(sut={sut_address!r}, role={role!r}, transfer={transfer!r}, transport={transport!r},"
        f" mode={mode!r}, directory={str(keeper_dir)!r}, debug=True)\n"
        "try:\n"
        f"    sys.exit(run_exec({command!r}, options))\n"
        "except FdkeeperError as error:\n"
        "    print(error, file=sys.stderr); sys.exit(2)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process, timeout=30) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def register_static(sipagent, kamailio, keeper_dir, how="plain", transfer="scm"):
    command = [sipagent, "register", kamailio.host, str(kamailio.port), USER, kamailio.domain, how]
    status, _out, err = finished(exec_agent(keeper_dir, command, sut_address=kamailio.address, transfer=transfer))
    assert status == 0, err
    assert "handed over kept connection" in err and "detached" in err, err
    return err


@pytest.mark.parametrize("transfer", ["scm", "pidfd"])
def test_static_agent_registers_then_another_answers(sipagent, sipp_path, kamailio, keeper_dir, tmp_path, transfer):
    register_static(sipagent, kamailio, keeper_dir, transfer=transfer)
    [connection] = kept(keeper_dir)
    # The agent's shutdown(), SO_LINGER {1,0} and close() on its way out did not end it.
    assert connection["state"] == "idle", connection
    answer = exec_agent(keeper_dir, [sipagent, "answer"], role="server", transfer=transfer)
    caller = call(kamailio, sipp_path, tmp_path)
    status, out, err = finished(answer)
    assert status == 0, err
    assert caller.ok, caller.summary()
    assert out.startswith(f"accepted {connection['remote']}")  # accept() gave the SuT's address
    assert len(kamailio.tcp_connections()) == 1
    [connection] = kept(keeper_dir)
    assert connection["state"] == "idle" and connection["leases"] == 2


@pytest.mark.parametrize("how", ["thread", "fork"])
def test_connect_in_a_thread_or_forked_child_among_busy_threads(
    sipagent, sipp_path, kamailio, keeper_dir, tmp_path, how
):
    register_static(sipagent, kamailio, keeper_dir, how=how)
    assert [c["state"] for c in kept(keeper_dir)] == ["idle"]
    answer = exec_agent(keeper_dir, [sipagent, "answer"], role="server")
    caller = call(kamailio, sipp_path, tmp_path)
    status, _, err = finished(answer)
    assert status == 0 and caller.ok, err


# ------------------------------------------------------------------ ptrace refused

NO_PTRACE = """
import ctypes, os, struct, sys
# A seccomp filter that makes ptrace() fail with EPERM, as a container's default profile does.
ptrace_nr, errno_eperm, allow = 101, 0x00050000 | 1, 0x7FFF0000
code = [(0x20, 0, 0, 0), (0x15, 0, 1, ptrace_nr), (0x06, 0, 0, errno_eperm), (0x06, 0, 0, allow)]
program = b"".join(struct.pack("<HBBI", *i) for i in code)
buf = ctypes.create_string_buffer(program)
fprog = struct.pack("<HxxxxxxQ", len(code), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0
assert libc.prctl(22, 2, ctypes.c_char_p(fprog)) == 0, ctypes.get_errno()
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_ptrace_refused_gives_one_line_and_leaves_the_connection(sipagent, kamailio, keeper_dir, tmp_path):
    register_static(sipagent, kamailio, keeper_dir)
    [before] = kept(keeper_dir)
    command = [sipagent, "register", kamailio.host, str(kamailio.port), USER, kamailio.domain]
    code = (
        "import sys\nfrom fdkeeper.errors import FdkeeperError\nfrom fdkeeper.agent import ExecOptions, run_exec\n"
        f"try:\n    sys.exit(run_exec({command!r}, ExecOptions(sut={kamailio.address!r}, mode='ptrace', directory={str(keeper_dir)!r})))\n"
        "except FdkeeperError as error:\n    print(error, file=sys.stderr); sys.exit(2)\n"
    )
    done = subprocess.run([sys.executable, "-c", NO_PTRACE, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "ptrace refused" in lines[0] and "seccomp" in lines[0], lines[0]
    [after] = kept(keeper_dir)
    assert after["state"] == "idle" and after["leases"] == before["leases"] and after["local"] == before["local"]


# ------------------------------------------------------------------ TLS: the descriptor is a socketpair end


def test_tls_register_then_answer_with_sipp(sipp_path, kamailio_tls, keeper_dir, tmp_path, test_pki):
    users = testbed.write_users_csv(tmp_path / "users-tls.csv", [USER], kamailio_tls.domain)
    options = ("--mode", "ptrace", "--tls-ca", str(test_pki.ca_cert), "--tls-sni", test_pki.server_name)
    register = start_through_fdkeeper(
        sipp_path,
        "uac-register.xml",
        kamailio_tls.tls_address,
        directory=keeper_dir,
        log_dir=tmp_path / "logs",
        name="register",
        options=options,
        transport="l1",
        calls=1,
        timeout=15,
        extra=["-inf", str(users)],
    ).wait(30)
    assert register.ok, register.summary()
    answer = start_through_fdkeeper(
        sipp_path,
        "uas-answer.xml",
        kamailio_tls.tls_address,
        directory=keeper_dir,
        log_dir=tmp_path / "logs",
        name="answer",
        options=("--mode", "ptrace"),
        transport="l1",
        calls=1,
        timeout=30,
        local_port=testbed.free_port(),
    )
    caller = call(kamailio_tls, sipp_path, tmp_path)
    answered = answer.wait(30)
    assert caller.ok, caller.summary()
    assert answered.ok, answered.summary()
    [connection] = kept(keeper_dir)
    assert connection["transport"] == "tls" and connection["state"] == "idle" and connection["leases"] == 2


# ------------------------------------------------------------------ per-call runs: epoll registrations (no SuT)


def test_registrations_noted_are_handed_out_for_that_socket_only():
    book = Registrations()
    book.added((1, 9), ino=100, epfd=4, events=1, data=7)
    book.changed((1, 9), EPOLL_CTL_MOD, 4, 5, 8)
    book.added((1, 9), ino=100, epfd=6, events=1, data=9)
    book.changed((1, 9), EPOLL_CTL_DEL, 6, 0, 0)
    assert book.of((1, 9), ino=100) == [(4, 5, 8)]
    assert book.of((1, 9), ino=100) is None  # taken once: the handoff replaces that socket
    book.added((1, 9), ino=100, epfd=4, events=1, data=7)
    assert book.of((1, 9), ino=200) is None  # the number names another socket now: not trusted


def test_a_registration_added_from_outside_is_the_programs_own():
    """What add_from_outside relies on: a registration made on our copy of the program's epoll
    set, under the program's descriptor number, serves the program's epoll_wait and its
    epoll_ctl(MOD) on that number, and outlives our copies."""
    ep = select.epoll()
    kept, peer = socket.socketpair()
    number = os.dup(kept.fileno())  # the program's descriptor of the kept connection
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the program: its MOD fails with ENOENT unless (file, number) is registered
        code = 1
        try:
            os.read(go_r, 1)
            ep.modify(number, select.EPOLLIN | select.EPOLLOUT)
            code = 0
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    os.close(number)  # free in our table, as it is in fdkeeper's
    try:
        assert not add_from_outside(pidfd, kept.fileno(), kept.fileno(), [(ep.fileno(), select.EPOLLIN, 1)])
        assert add_from_outside(pidfd, number, kept.fileno(), [(ep.fileno(), select.EPOLLIN, 0x5EED)])
        with pytest.raises(OSError):
            os.fstat(number)  # our copy under that number is closed again
        peer.send(b"x")
        assert ep.poll(1) == [(0x5EED, select.EPOLLIN)]
    finally:
        os.write(go_w, b"g")
        status = os.waitpid(pid, 0)[1]
        for fd in (pidfd, go_r, go_w):
            os.close(fd)
        ep.close()
        kept.close()
        peer.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_traced_run_does_not_import_python_ptrace():
    """Its import (tools, logging, CPU-info modules) cost milliseconds of every traced run's
    start-up; raw.py makes the few ptrace calls itself."""
    code = "import sys, fdkeeper.modes.ptrace.session; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ptrace'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_an_error_in_a_role_handler_ends_the_run_with_its_traceback_not_a_hang(sipagent, kamailio, keeper_dir):
    """The task held in its stop when a handler fails is detached, not waited for (it would never
    stop again), so the error reaches the user."""
    command = [sipagent, "register", kamailio.host, str(kamailio.port), USER, kamailio.domain]
    code = (
        "import sys\nfrom fdkeeper.agent import ExecOptions, run_exec\nfrom fdkeeper.modes.ptrace import client\n"
        "def broken(self, stop):\n    raise RuntimeError('a bug in a handler')\n"
        "client.ClientRole.on_entry = broken\n"
        f"sys.exit(run_exec({command!r}, ExecOptions(sut={kamailio.address!r}, mode='ptrace', directory={str(keeper_dir)!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "RuntimeError: a bug in a handler" in done.stderr, done.stderr


# ------------------------------------------------------------------ per-call runs: an exec


def test_a_per_call_run_counts_the_stub_at_each_exec_before_the_program_goes(tmp_path):
    """The send stub's count of rewritten messages lives in the program's memory, which an exec
    replaces: the per-call filter stops execve(), and the role counts there, while the program
    that execs is still the one in the process; the exec's own event comes after."""
    request = HandoffRequest(
        program=Path("/bin/sh"), args=[], role="client", control_socket=tmp_path / "control", remote=None, per_call=True
    )
    tracer = Tracer.start(["/bin/sh", "-c", "exec /bin/true"], {}, percall_filter())
    session = Session(tracer, request, "scm")
    role, seen = session.role, []
    role.stubs.count = lambda tid, tgid: seen.append(os.readlink(f"/proc/{tid}/exe"))
    on_exec = role.on_exec
    role.on_exec = lambda pid: (seen.append("exec"), on_exec(pid))
    assert os.waitstatus_to_exitcode(session.run()) == 0
    # The forked fdkeeper (Python) becomes sh, which becomes true; and true's own end (a thread's exit).
    sh, true = str(Path("/bin/sh").resolve()), str(Path("/bin/true").resolve())
    assert seen == [str(Path(sys.executable).resolve()), "exec", sh, "exec", true]
