"""The seccomp filter the ptrace mode leaves in the program: neutral calls on kept descriptors.

Why seccomp: it works without a tracer, so ptrace can detach at once and the hot path pays
only this filter's few instructions, while sipp's exit-time shutdown still never reaches the
kernel, even if fdkeeper is gone.
"""

from __future__ import annotations

import errno
import struct

from fdkeeper.modes.ptrace.injection import Injection
from fdkeeper.modes.ptrace.raw import SYS

AUDIT_ARCH_X86_64 = 0xC000003E

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO_0 = 0x00050000  # skip the call, return 0 (errno 0): the program sees success
SECCOMP_RET_TRACE = 0x7FF00000  # stop for the tracer (PTRACE_EVENT_SECCOMP)
SOL_SOCKET, SO_LINGER, IPPROTO_TCP = 1, 13, 6
EPOLL_CTL_ADD = 1
_LD_ABS_W, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
MSG_NOSIGNAL = 0x4000
EPOLL_COOKIE = 0x314B4446  # "FDK1": an epoll_ctl() made by the send stub (sendstub.py), noted there
FDS_PER_FILTER = 200  # BPF conditional jumps reach 255 instructions ahead


def protection_filter(kept: list[int], pairs: list[int]) -> bytes:
    """A seccomp filter (struct sock_filter[]) that makes, on the kept descriptors,
    shutdown() and setsockopt(SOL_SOCKET, SO_LINGER) succeed without effect, and on
    socketpair ends (TLS) every IPPROTO_TCP option too; everything else is allowed.

    Why seccomp: it works without a tracer, so ptrace can detach at once and the hot path
    pays only this filter's few instructions, while sipp's exit-time shutdown still never
    reaches the kernel. It matches fd numbers, not files (see the mode's limits).
    """
    program: list[tuple[int, int | str, int | str, int]] = []  # (code, jt, jf, k) with labels
    labels: dict[str, int] = {}

    def ld(offset: int) -> None:
        program.append((_LD_ABS_W, 0, 0, offset))

    def jeq(value: int, target: str) -> None:  # if A == value goto target
        program.append((_JEQ_K, target, 0, value))

    def jne(value: int, target: str) -> None:  # if A != value goto target
        program.append((_JEQ_K, 0, target, value))

    def ret(value: int) -> None:
        program.append((_RET_K, 0, 0, value))

    ld(4)  # arch
    jne(AUDIT_ARCH_X86_64, "allow")
    ld(0)  # nr
    jeq(SYS["shutdown"], "fds_all")
    jne(SYS["setsockopt"], "allow")
    ld(24)  # level (low word of args[1])
    jeq(IPPROTO_TCP, "fds_pair")
    jne(SOL_SOCKET, "allow")
    ld(32)  # optname
    jne(SO_LINGER, "allow")
    for label, fds in (("fds_all", kept), ("fds_pair", pairs)):
        labels[label] = len(program)
        ld(16)  # fd (low word of args[0])
        for fd in fds:
            jeq(fd, "neutral")
        ret(SECCOMP_RET_ALLOW)
    labels["allow"] = len(program)
    ret(SECCOMP_RET_ALLOW)
    labels["neutral"] = len(program)
    ret(SECCOMP_RET_ERRNO_0)

    return _assemble(program, labels)


Instruction = tuple[int, "int | str", "int | str", int]


def percall_filter() -> bytes:
    """The filter of a per-call client run (-t tn/ln), installed before sipp starts.

    connect() stops for the tracer (the one call a per-call handoff starts from), and so does
    epoll_ctl(EPOLL_CTL_ADD): the tracer notes each registration as it is made, so that the
    handoff can re-add it without reading /proc/PID/fdinfo of the epoll descriptor (which
    lists every registration: milliseconds per call with a thousand users). shutdown(),
    SO_LINGER and TCP-level options succeed without effect on every descriptor, because in
    such a run every TCP socket of sipp's either is or becomes a kept connection (or a
    socketpair end the keeper relays). sendto() without an address (sipp's send(), which
    glibc makes a sendto) stops too: the first one on a per-call socket is where its handoff is
    made (once the process is known to send that way), and the tracer puts the kept
    connection's address where the program wrote its placeholder's (viarewrite.py); one with
    MSG_NOSIGNAL does not: that is how the tracer reruns a first send it has dealt with
    already, and how the send stub (sendstub.py) sends a kept fd's later messages it rewrote,
    in a program that ignores SIGPIPE anyway; nor does an epoll_ctl() with EPOLL_COOKIE in its
    5th argument (which the kernel ignores): the send stub's fdk_epoll_ctl noted that
    registration already. execve() and execveat() stop too, rarely: the exec is about to take
    the send stub's page with the program, and its count of rewritten messages is read there.
    Everything else runs at full speed, untraced.
    """
    program: list[Instruction] = [
        (_LD_ABS_W, 0, 0, 4),
        (_JEQ_K, 0, "allow", AUDIT_ARCH_X86_64),
        (_LD_ABS_W, 0, 0, 0),
        (_JEQ_K, "trace", 0, SYS["connect"]),
        (_JEQ_K, "neutral", 0, SYS["shutdown"]),
        (_JEQ_K, "sendto", 0, SYS["sendto"]),
        (_JEQ_K, "epoll_ctl", 0, SYS["epoll_ctl"]),
        (_JEQ_K, "trace", 0, SYS["execve"]),
        (_JEQ_K, "trace", 0, SYS["execveat"]),
        (_JEQ_K, 0, "allow", SYS["setsockopt"]),
        (_LD_ABS_W, 0, 0, 24),
        (_JEQ_K, "neutral", 0, IPPROTO_TCP),
        (_JEQ_K, 0, "allow", SOL_SOCKET),
        (_LD_ABS_W, 0, 0, 32),
        (_JEQ_K, "neutral", "allow", SO_LINGER),
    ]
    labels = {"epoll_ctl": len(program)}
    program += [
        (_LD_ABS_W, 0, 0, 24),
        (_JEQ_K, 0, "allow", EPOLL_CTL_ADD),  # op: low word of args[1]
        (_LD_ABS_W, 0, 0, 48),
        (_JEQ_K, "allow", "trace", EPOLL_COOKIE),  # args[4]: noted by the stub
    ]
    labels["sendto"] = len(program)
    program += [
        (_LD_ABS_W, 0, 0, 48),
        (_JEQ_K, 0, "allow", 0),
        (_LD_ABS_W, 0, 0, 52),
        (_JEQ_K, 0, "allow", 0),  # no address
        (_LD_ABS_W, 0, 0, 40),
        (_JSET_K, "allow", "trace", MSG_NOSIGNAL),  # flags: low word of args[3]
    ]
    for label, action in (("allow", SECCOMP_RET_ALLOW), ("trace", SECCOMP_RET_TRACE), ("neutral", SECCOMP_RET_ERRNO_0)):
        labels[label] = len(program)
        program.append((_RET_K, 0, 0, action))
    return _assemble(program, labels)


def _assemble(program: list[Instruction], labels: dict[str, int]) -> bytes:
    """struct sock_filter[] with each label turned into a relative jump."""
    out = bytearray()
    for index, (code, jt, jf, k) in enumerate(program):
        jt = labels[jt] - index - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - index - 1 if isinstance(jf, str) else jf
        assert 0 <= jt < 256 and 0 <= jf < 256, "filter too long for one BPF jump"
        out += struct.pack("<HBBI", code, jt, jf, k)
    return bytes(out)


def install_protection(injection: Injection, kept: list[int], pairs: list[int]) -> None:
    """Install the filter in the held program, all its threads (TSYNC); chunks of fds."""
    for start in range(0, max(len(kept), 1), FDS_PER_FILTER):
        chunk = kept[start : start + FDS_PER_FILTER]
        code = protection_filter(chunk, [fd for fd in pairs if fd in chunk])
        base = injection.scratch_area()
        program_at = base + 4096
        injection.tracer.write(injection.tid, program_at, code)
        injection.tracer.write(injection.tid, base + 4032, struct.pack("<HxxxxxxQ", len(code) // 8, program_at))
        result = injection.call("seccomp", 1, 1, base + 4032)  # SET_MODE_FILTER, FLAG_TSYNC
        if result == -errno.EACCES:
            # Without CAP_SYS_ADMIN a filter needs no_new_privs (the program's later execs
            # then cannot gain privileges: documented in the mode's limits).
            injection.check("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            result = injection.call("seccomp", 1, 1, base + 4032)
        if result != 0:
            raise OSError(
                -result if result < 0 else errno.EBUSY,
                "installing the seccomp filter that keeps shutdown() off the kept connection",
            )
