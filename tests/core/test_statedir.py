"""The state directory under attack: root is the victim, a second local uid the attacker (issue 10).

Each test first builds what the attacker could (a squatted directory with a fake keeper, links
planted next to keeper.lock/keeper.log, a keeper of another uid) and then checks that fdkeeper
refuses with one line and exit status 2, without touching the attacker's socket or files.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdkeeper import statedir
from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.statedir import (
    LOCK_NAME,
    LOG_NAME,
    MAX_SOCKET_PATH,
    NotPrivate,
    default_directory,
    ensure_private_directory,
    socket_path,
)

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second uid (setpriv)")

NOBODY = pwd.getpwnam("nobody")
DAEMON = pwd.getpwnam("daemon")


def as_user(user: pwd.struct_passwd) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


# A keeper impostor: answers every request OK and prints one line per connection it accepted,
# with how many bytes of request it got. With an inherited descriptor it listens on a socket
# the test bound in a directory of root's: SO_PEERCRED names whoever called listen().
FAKE_KEEPER = r"""
import os, socket, sys
path = sys.argv[1]
if len(sys.argv) > 2:
    listener = socket.socket(fileno=int(sys.argv[2]))
else:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.chmod(os.path.dirname(path), 0o777)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    os.chmod(path, 0o777)
listener.listen(8)
print("ready", flush=True)
while True:
    client, _ = listener.accept()
    client.settimeout(2)
    try:
        request = client.recv(65536)
        client.send(b"OK pid=1 version=0")
    except OSError:
        request = b""
    print("accepted", len(request), flush=True)
    client.close()
"""


class FakeKeeper:
    def __init__(self, user: pwd.struct_passwd, path: Path, inherited: socket.socket | None = None) -> None:
        extra = [str(inherited.fileno())] if inherited else []
        self.process = subprocess.Popen(
            [*as_user(user), sys.executable, "-c", FAKE_KEEPER, str(path), *extra],
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
            pass_fds=[inherited.fileno()] if inherited else [],
        )
        assert self.process.stdout.readline().strip() == "ready"

    def accepted(self) -> list[int]:
        """Bytes of request received per accepted connection (ends the impostor)."""
        time.sleep(0.3)  # let it accept anything still queued
        self.process.terminate()
        out, _ = self.process.communicate(timeout=10)
        return [int(line.split()[1]) for line in out.splitlines() if line.startswith("accepted")]


def fdkeeper(*args: str, env: dict | None = None, user: pwd.struct_passwd | None = None) -> subprocess.CompletedProcess:
    command = [*(as_user(user) if user else []), sys.executable, "-m", "fdkeeper", *args]
    environment = {**os.environ, **(env or {})}
    environment.pop("XDG_RUNTIME_DIR", None)  # as for root and in CI
    if env is None or "FDKEEPER_DIR" not in env:
        environment.pop("FDKEEPER_DIR", None)
    return subprocess.run(command, capture_output=True, text=True, timeout=30, env=environment, cwd="/")


def assert_one_line_refusal(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fdkeeper: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def squatted() -> Iterator[tuple[Path, FakeKeeper]]:
    """A state directory under /tmp that nobody made first (0777), with a fake keeper in it."""
    directory = Path(tempfile.gettempdir()) / f"fdkeeper-squat-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    fake = FakeKeeper(NOBODY, socket_path(directory))
    yield directory, fake
    fake.process.kill()
    shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- 1. squatted directory


@pytest.mark.parametrize(
    "command", [["status"], ["stop"], ["keeper"], ["sipp", "-sn", "uac", "-t", "t1", "-m", "1", "127.0.0.1:9"]]
)
def test_a_squatted_directory_is_refused_before_its_socket_is_touched(squatted, command):
    directory, fake = squatted
    result = fdkeeper(*command, env={"FDKEEPER_DIR": str(directory)})
    assert_one_line_refusal(result, str(directory), "uid 65534 (nobody)", "mode 0777", "rm -r")
    assert fake.accepted() == []


def test_ensure_keeper_refuses_a_squatted_directory(squatted):
    directory, fake = squatted
    with pytest.raises(NotPrivate, match="belongs to uid 65534"):
        ensure_keeper(directory)
    with pytest.raises(NotPrivate):
        KeeperClient(directory).status()
    assert fake.accepted() == []
    assert not (directory / LOG_NAME).exists()


def test_the_default_directory_of_a_user_cannot_be_squatted_by_another():
    """nobody's default is /tmp/fdkeeper-65534; daemon makes it first, with a fake keeper."""
    directory = Path("/tmp/fdkeeper-65534")
    if directory.exists():
        pytest.skip(f"{directory} exists already")
    fake = FakeKeeper(DAEMON, socket_path(directory))
    try:
        for command in (["status"], ["stop"]):
            result = fdkeeper(*command, user=NOBODY)
            assert_one_line_refusal(result, str(directory), "uid 1 (daemon)", "mode 0777")
        assert fake.accepted() == []
    finally:
        fake.process.kill()
        shutil.rmtree(directory, ignore_errors=True)


def test_the_default_directory_is_one_others_cannot_create(monkeypatch, tmp_path):
    monkeypatch.delenv("FDKEEPER_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    expected = Path("/run/user/0/fdkeeper") if Path("/run/user/0").is_dir() else Path("/run/fdkeeper")
    assert default_directory() == expected  # root: never a fixed name under /tmp
    others = tmp_path / "others"
    others.mkdir()
    os.chown(others, NOBODY.pw_uid, NOBODY.pw_gid)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(others))  # kept by sudo from the invoking user
    assert default_directory() == expected
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ours))
    assert default_directory() == ours / "fdkeeper"
    shown = subprocess.run(
        [*as_user(NOBODY), sys.executable, "-c", "from fdkeeper.statedir import default_directory as d; print(d())"],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "XDG_RUNTIME_DIR": ""},
        check=True,
    )
    assert shown.stdout.strip() == "/tmp/fdkeeper-65534"  # checked like any other when used


def test_a_parent_another_user_owns_is_refused(tmp_path):
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(NotPrivate, match=f"{parent}, a parent of the state directory .* belongs to uid 65534"):
        ensure_private_directory(parent / "state")


def test_a_parent_others_can_write_to_is_refused_unless_sticky(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could rename our directory away and put theirs in its place
    with pytest.raises(NotPrivate, match=r"writable by other users \(mode 0777, not sticky\)"):
        ensure_private_directory(shared / "state")
    shared.chmod(0o1777)  # like /tmp: only an entry's owner may rename or remove it
    assert ensure_private_directory(shared / "state") == shared / "state"


# ---------------------------------------------------------------- 5. links


@pytest.fixture
def precious(tmp_path) -> Path:
    """A root-owned file elsewhere that planted links point at."""
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    return target


def plant_links(directory: Path, target: Path) -> None:
    for name in (LOCK_NAME, LOG_NAME):
        (directory / name).symlink_to(target)


def test_links_in_a_loose_directory_are_not_followed(tmp_path, precious):
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    plant_links(loose, precious)
    result = fdkeeper("keeper", "--dir", str(loose))
    assert_one_line_refusal(result, str(loose), "writable by other users", "mode 0777", f"chmod 700 {loose}")
    with pytest.raises(NotPrivate, match="chmod 700"):
        ensure_keeper(loose)
    assert precious.read_text() == "keep me\n"
    assert loose.stat().st_mode & 0o777 == 0o777  # refused, not silently changed


def test_links_planted_before_a_directory_was_tightened_are_not_followed(tmp_path, precious):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    plant_links(private, precious)
    result = fdkeeper("keeper", "--dir", str(private))  # opens keeper.lock
    assert_one_line_refusal(result, f"{private / LOCK_NAME} is a symbolic link", "remove it")
    with pytest.raises(NotPrivate, match=f"{private / LOG_NAME} is a symbolic link"):
        ensure_keeper(private)  # opens keeper.log for the keeper it starts
    assert precious.read_text() == "keep me\n"


def test_a_symlinked_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    for command in ("status", "stop", "keeper"):
        assert_one_line_refusal(fdkeeper(command, "--dir", str(link)), str(link), "symbolic link")
    with pytest.raises(NotPrivate, match="symbolic link"):
        ensure_keeper(link)
    assert list(real.iterdir()) == []


# ---------------------------------------------------------------- 10. --dir that cannot be one


def test_a_file_as_directory_is_one_line(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    for command in ("status", "stop", "keeper"):
        assert_one_line_refusal(fdkeeper(command, "--dir", str(file)), str(file), "not a directory")


def test_a_directory_too_long_for_a_unix_socket_is_one_line(tmp_path):
    long = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    for command in ("status", "stop"):
        assert_one_line_refusal(
            fdkeeper(command, "--dir", str(long)), f"longer than {MAX_SOCKET_PATH} bytes", "shorter --dir"
        )
    long.mkdir()
    assert_one_line_refusal(fdkeeper("status", "--dir", str(long)), "shorter --dir")


def test_a_missing_directory_still_means_no_keeper(tmp_path):
    result = fdkeeper("stop", "--dir", str(tmp_path / "none"))
    assert result.returncode == 0 and "no keeper was running" in result.stdout
    with pytest.raises(FdkeeperError, match="no keeper runs for"):
        KeeperClient(tmp_path / "none").status()


# ---------------------------------------------------------------- peer credentials


def test_a_keeper_of_another_uid_is_refused(tmp_path):
    """The directory is root's and private, but the process answering on its socket is nobody's."""
    directory = ensure_private_directory(tmp_path / "state")
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bound.bind(str(socket_path(directory)))
    fake = FakeKeeper(NOBODY, socket_path(directory), inherited=bound)
    bound.close()
    try:
        with pytest.raises(NotPrivate, match=r"runs as uid 65534 \(nobody\), not as you or root"):
            ensure_keeper(directory)  # refused: not taken as "no keeper" to start afresh
        assert_one_line_refusal(fdkeeper("status", "--dir", str(directory)), "uid 65534", str(socket_path(directory)))
        assert_one_line_refusal(fdkeeper("stop", "--dir", str(directory)), "uid 65534")
        assert all(size == 0 for size in fake.accepted())  # no request ever reached it
    finally:
        fake.process.kill()


def test_a_converter_of_another_uid_is_refused(tmp_path):
    from fdkeeper.convert import control_request

    directory = ensure_private_directory(tmp_path / "state")
    path = directory / "convert-127.0.0.1-5060-tcp.sock"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))
    fake = FakeKeeper(NOBODY, path, inherited=bound)
    bound.close()
    try:
        with pytest.raises(NotPrivate, match="uid 65534"):
            control_request(path, "STATUS")
        assert_one_line_refusal(fdkeeper("stop", "--dir", str(directory)), "uid 65534", str(path))
        assert all(size == 0 for size in fake.accepted())
    finally:
        fake.process.kill()


def test_our_own_keeper_passes_every_check(tmp_path):
    client = ensure_keeper(tmp_path / "state")
    try:
        assert client.alive()
        assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
        for name in (LOCK_NAME, LOG_NAME):
            assert (tmp_path / "state" / name).stat().st_mode & 0o077 == 0
        assert fdkeeper("status", "--dir", str(tmp_path / "state")).returncode == 0
    finally:
        client.stop()


# ---------------------------------------------------------------- files a request names (issue 16)


@pytest.mark.parametrize("kind", ["a FIFO", "a directory", "a character device"])
def test_a_file_swapped_in_after_the_look_is_refused_through_its_descriptor(tmp_path, monkeypatch, kind):
    """The attacker wins the race between lstat and open: O_NONBLOCK opens a FIFO at once, the
    descriptor's fstat refuses it, and no descriptor is left behind; nothing waits for a writer."""
    path = {"a FIFO": tmp_path / "ca.pem", "a directory": tmp_path, "a character device": Path("/dev/zero")}[kind]
    if kind == "a FIFO":
        os.mkfifo(path)
    monkeypatch.setattr(statedir, "_lstat", lambda _path: None)  # the look saw nothing yet
    before = set(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    with pytest.raises(FdkeeperError, match=rf"^fdkeeper: --tls-ca \S+ is {kind}; name a regular file$"):
        statedir.open_named_file(str(path), os.O_RDONLY, "--tls-ca")
    assert time.monotonic() - started < 1
    assert set(os.listdir("/proc/self/fd")) <= before
