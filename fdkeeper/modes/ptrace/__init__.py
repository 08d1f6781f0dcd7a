"""Handoff by ptrace: the shim's work done from outside the program (static sipp, any agent).

fdkeeper starts the program traced and watches its system calls until the handoff is done:

- client role: at connect() of an AF_INET/6 SOCK_STREAM socket to the SuT, fdkeeper leases
  the kept connection, makes the program take it (pidfd_getfd of fdkeeper's copy, or a
  recvmsg() of SCM_RIGHTS from fdkeeper), dup3()s it onto the program's descriptor, re-adds
  the epoll registrations the dup3 dropped (read from /proc/PID/fdinfo of the epoll fds),
  replays the program's socket options, and makes connect() return 0;
- server role: after the first listen() of a TCP socket it leases the kept connections,
  puts them into the program, makes epoll_wait() report the listener readable (timeouts
  cut to 0 meanwhile) and accept() on it return them one by one, with their peer address;
- per-call client (-t tn/ln): the program starts under a seccomp filter that stops only
  connect(), epoll_ctl(ADD) and sendto() without an address (SECCOMP_RET_TRACE) and the
  tracer stays attached: each connect() to the SuT is skipped, the thread followed to its
  first send, and the kept connection of the message's From AoR put in place of the socket,
  its epoll registrations re-added from outside (percall.py, epoll.py); at each send on such
  an fd the placeholder's IP:PORT that sipp wrote ([local_port]) is replaced in sipp's buffer
  by the kept connection's (viarewrite.py); everything else runs untraced.

Before letting go (t1/l1, server) it installs a seccomp filter in the program (all threads)
that makes shutdown() and SO_LINGER (and TCP options on a TLS socketpair end) no-ops on the kept
descriptors, then detaches: from then on the program runs untraced at full speed, and
its exit-time shutdown never reaches the kernel even if fdkeeper is gone.

Modules: mode (the contract; imported on every start-up, so light), permission (may we
trace here, and why not); session (the syscall loop of one traced run, and its table of
roles), whose roles are client (t1/l1 client: the handoff at connect()), percall (per-call
client) and server (server role), each working through services (what every role calls on:
leases, the program's sockets, handing a descriptor over, the options not replayed, saying);
aor (the From AoR a per-call connection is leased by), rewrites and viarewrite (the kept
connection's address in what a per-call fd sends), epoll (the program's epoll registrations,
noted and re-added), handoff_code (a per-call handoff run by the program itself), transfer
(getting descriptors into the program), procfs (what /proc and raw socket addresses tell),
seccomp (the filters); injection (syscalls run inside a held thread) on tracer (the traced
program's tasks and their syscall stops) on raw (ptrace(2) and x86_64's syscalls by ctypes).
The run-time modules use plain classes, not dataclasses: a dataclass compiles code at
import, and they are imported on every --mode ptrace start-up, where each millisecond counts.
"""

from fdkeeper.modes.ptrace.mode import PtraceHandoff, PtraceMode

__all__ = ["PtraceHandoff", "PtraceMode"]
