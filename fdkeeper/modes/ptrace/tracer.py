"""The tracer: a program started traced, its tasks followed, their syscall stops reported.

Start a program traced (PTRACE_SEIZE of a forked child before its exec, so every thread and
child it makes is traced too), stop it at syscall entries and exits (or, under a seccomp
filter, only where the filter says), hold back signals while a thread is ours, read and write
its memory, detach. raw.py gives us the raw ptrace calls and the register struct; the event
loop is our own, because the handoff needs to hold one thread while others keep running.
Running syscalls inside a held thread is injection.py's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
from collections.abc import Callable

from fdkeeper.modes.ptrace import raw as pt
from fdkeeper.modes.ptrace.raw import (
    PTRACE_CONT,
    PTRACE_EVENT_SECCOMP,
    PTRACE_GET_SYSCALL_INFO,
    PTRACE_INTERRUPT,
    PTRACE_SEIZE,
    PTRACE_SYSEMU,
)

OPTIONS = (
    pt.PTRACE_O_TRACESECCOMP  # stops at the calls a SECCOMP_RET_TRACE filter names (per-call runs)
    | pt.PTRACE_O_TRACESYSGOOD
    | pt.PTRACE_O_TRACEFORK
    | pt.PTRACE_O_TRACEVFORK
    | pt.PTRACE_O_TRACECLONE
    | pt.PTRACE_O_TRACEEXEC
    | pt.PTRACE_O_EXITKILL  # a tracer that dies mid-handoff must not leave a half-changed program
)
SYSCALL_TRAP = signal.SIGTRAP | 0x80
WALL = 0x40000000


class PtraceRefused(Exception):
    """The kernel refused to let us trace the program (EPERM/EACCES from PTRACE_SEIZE)."""

    def __init__(self, error: int) -> None:
        super().__init__(os.strerror(error))
        self.errno = error


class TraceeGone(Exception):
    """The thread we were working on exited (killed, or exit_group from another thread)."""


# Plain classes, not dataclasses: a dataclass compiles code at import, and this module is
# imported on every --mode ptrace start-up, where each millisecond counts.
class SyscallStop:
    """A task held at a syscall's entry or exit (or a seccomp stop): what the tracer reports."""

    __slots__ = ("args", "emulated", "entry", "nr", "rval", "seccomp", "tid")

    def __init__(
        self,
        tid: int,
        entry: bool,
        nr: int = -1,
        args: tuple[int, ...] = (),
        rval: int = 0,
        seccomp: bool = False,
        emulated: bool = False,
    ) -> None:
        self.tid = tid
        self.entry = entry
        self.seccomp = seccomp  # a SECCOMP_RET_TRACE stop (before the call runs), not a syscall-entry stop
        # An entry stop of an ``emulating`` thread: the call does not run unless Tracer.rerun()
        # sends the thread back onto it (it returns what rax says at the resume).
        self.emulated = emulated
        self.nr = nr  # entry only
        self.args = args  # entry only
        self.rval = rval  # exit only


class Task:
    """One traced thread, and the signals it got while held by us."""

    __slots__ = ("signals", "tid")

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.signals: list[int] = []  # signals held back during an injection


class Tracer:
    """All tasks of one traced program; events arrive through ``next_stop``."""

    def __init__(self, root: int) -> None:
        self.root = root
        # False: every task stops at every syscall (PTRACE_SYSCALL). True: tasks run on with
        # PTRACE_CONT and stop only where the seccomp filter says, except the ``stepping`` ones.
        self.continuous = False
        self.stepping: set[int] = set()
        # Stepping threads resumed with PTRACE_SYSEMU: stopped at each syscall's entry only (no
        # exit stop), the call skipped unless rerun(); the tracer may do its work instead.
        self.emulating: set[int] = set()
        self._rerunning: set[int] = set()  # rerun() calls in progress: back to emulating at their exit
        # Held at an emulated entry stop: resumed with PTRACE_SYSCALL, such a thread first reports
        # the skipped call's exit, which resume() takes out of the way.
        self._emulated_at: set[int] = set()
        self.tasks: dict[int, Task] = {root: Task(root)}
        self.root_status: int | None = None  # raw wait status once the root exited
        self.stops = 0  # every ptrace stop and exit seen: what the traced program waited on us for
        self.on_exec: Callable[[int], None] | None = None  # told the pid of a process that exec'd
        # Told the tid of a thread about to exit, its memory still there (continuous runs only:
        # PTRACE_O_TRACEEXIT, one stop per thread, at its end).
        self.on_exit: Callable[[int], None] | None = None
        self._mem: dict[int, int] = {}

    # ------------------------------------------------------------ start and stop

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str], seccomp_filter: bytes = b"") -> Tracer:
        """Fork, seize the child while it waits on a pipe, then let it exec the program.

        With ``seccomp_filter`` the child installs it before its exec and the tracer runs
        continuous: the program stops only at the calls the filter traces.
        """
        fprog = pt.filter_program(seccomp_filter) if seccomp_filter else None
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: wait until traced, then become the program
            try:
                os.close(ready_w)
                os.read(ready_r, 1)
                if fprog is not None:
                    pt.install_filter_here(fprog)
                os.execve(argv[0], argv, env)
            except BaseException as error:
                os.write(2, f"fdkeeper: cannot run {argv[0]}: {error}\n".encode())
            os._exit(127)
        os.close(ready_r)
        try:
            pt.ptrace(PTRACE_SEIZE, pid, 0, OPTIONS | (pt.PTRACE_O_TRACEEXIT if fprog is not None else 0))
        except pt.PtraceError as error:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(ready_w)
            raise PtraceRefused(error.errno or errno.EPERM) from None
        os.write(ready_w, b"g")
        os.close(ready_w)
        tracer = cls(pid)
        tracer.continuous = fprog is not None
        return tracer

    def detach_all(self, current: int | None = None) -> None:
        """Stop every task, detach it; ``current`` is a task already held in a ptrace-stop."""
        pending = [tid for tid in self.tasks if tid != current]
        if current is not None and current in self.tasks:
            self._detach(current, 0)
        while pending:
            tid = pending.pop()
            try:
                pt.ptrace(PTRACE_INTERRUPT, tid)
            except pt.PtraceError:
                self.tasks.pop(tid, None)  # already gone
                continue
            while True:
                status = self._wait(tid)
                if status is None:
                    break
                sig, event = os.WSTOPSIG(status), status >> 16
                if event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE):
                    child = pt.ptrace_geteventmsg(tid)
                    self.tasks[child] = Task(child)
                    pending.append(child)
                # A signal-delivery-stop: hand the signal on with the detach.
                self._detach(tid, sig if event == 0 and sig != SYSCALL_TRAP else 0)
                break
        self._forget_memory()

    def _forget_memory(self) -> None:
        for fd in self._mem.values():
            os.close(fd)
        self._mem.clear()

    def _detach(self, tid: int, sig: int) -> None:
        task = self.tasks.pop(tid, None)
        try:
            pt.ptrace_detach(tid, sig)
        except pt.PtraceError:
            return
        for held in task.signals if task else ():
            os.kill(tid, held)  # thread-directed would be better; sipp's signals are process-wide

    # ------------------------------------------------------------ events

    def _wait(self, tid: int = -1) -> int | None:
        """Wait status of ``tid`` (or any task); None when it just exited (and is forgotten)."""
        pid, status = os.waitpid(tid, WALL)
        self.stops += 1
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.tasks.pop(pid, None)
            for marked in (self.stepping, self.emulating, self._rerunning, self._emulated_at):
                marked.discard(pid)  # a later thread may get its number
            if pid == self.root:
                self.root_status = status
            return None
        self._last_pid = pid
        return status

    def next_stop(self) -> SyscallStop | None:
        """The next syscall stop of any task; None once no task is traced any more.

        Fork/clone/exec events, group-stops and signals are handled here: new tasks are
        recorded, signals passed on, and the task resumed.
        """
        while self.tasks:
            try:
                status = self._wait()
            except ChildProcessError:
                self.tasks.clear()
                return None
            if status is None:
                continue
            tid = self._last_pid
            self.tasks.setdefault(tid, Task(tid))
            sig, event = os.WSTOPSIG(status), status >> 16
            if sig == SYSCALL_TRAP or event == PTRACE_EVENT_SECCOMP:
                return self._syscall_info(tid)
            if event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE):
                child = pt.ptrace_geteventmsg(tid)
                self.tasks.setdefault(child, Task(child))
                self.resume(tid)
            elif event:  # exec, or PTRACE_EVENT_STOP (new task, group-stop, interrupt)
                if event == pt.PTRACE_EVENT_EXEC:
                    self._forget_memory()  # a new address space: /proc/PID/mem must be reopened
                    if self.on_exec is not None:
                        self.on_exec(tid)
                elif event == pt.PTRACE_EVENT_EXIT and self.on_exit is not None:
                    self.on_exit(tid)
                self.resume(tid)
            else:  # a signal for the program: deliver it
                self.resume(tid, sig)
        return None

    def resume(self, tid: int, sig: int = 0, every_syscall: bool = False) -> None:
        """Let ``tid`` run on: to its next syscall stop, or (continuous) to the filter's next one."""
        try:
            if every_syscall or not self.continuous or (tid in self.stepping and tid not in self.emulating):
                if tid in self._emulated_at and self._past_emulated_exit(tid, sig):
                    sig = 0
                pt.ptrace_syscall(tid, sig)
            elif tid in self.emulating:
                pt.ptrace(PTRACE_SYSEMU, tid, 0, sig)
            else:
                pt.ptrace(PTRACE_CONT, tid, 0, sig)
        except pt.PtraceError:
            self.tasks.pop(tid, None)  # killed while stopped
            return
        self._emulated_at.discard(tid)
        task = self.tasks.get(tid)
        while task and task.signals:  # held back during an injection: deliver them now
            os.kill(tid, task.signals.pop(0))

    def _past_emulated_exit(self, tid: int, sig: int) -> bool:
        """From an emulated entry stop, to the skipped call's exit stop (signals held back);
        True once there, False when the thread is gone."""
        self._emulated_at.discard(tid)
        pt.ptrace_syscall(tid, sig)
        return self._until_syscall_stop(tid, lambda: pt.ptrace_syscall(tid, 0))

    def _until_syscall_stop(self, tid: int, resume: Callable[[], None]) -> bool:
        """Wait for the resumed ``tid``'s next syscall stop, recording the tasks it creates and
        holding back the signals it gets, ``resume()`` past each other stop; False when it is gone."""
        while True:
            status = self._wait(tid)
            if status is None:
                return False
            sig, event = os.WSTOPSIG(status), status >> 16
            if sig == SYSCALL_TRAP:
                return True
            if event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE):
                child = pt.ptrace_geteventmsg(tid)
                self.tasks.setdefault(child, Task(child))
            elif not event:
                self.tasks[tid].signals.append(sig)
            resume()

    def _syscall_info(self, tid: int) -> SyscallStop:
        buf = ctypes.create_string_buffer(88)
        pt.ptrace(PTRACE_GET_SYSCALL_INFO, tid, 88, ctypes.addressof(buf))
        op = buf.raw[0]
        if op in (1, 3):  # PTRACE_SYSCALL_INFO_ENTRY, _SECCOMP: nr and args at the same place
            nr, *args = struct.unpack_from("<7Q", buf.raw, 24)
            emulated = op == 1 and tid in self.emulating
            if emulated:
                self._emulated_at.add(tid)
            return SyscallStop(tid, True, nr, tuple(args), seccomp=op == 3, emulated=emulated)
        (rval,) = struct.unpack_from("<q", buf.raw, 24)
        if tid in self._rerunning:
            self._rerunning.discard(tid)
            if tid in self.stepping:
                self.emulating.add(tid)
        return SyscallStop(tid, False, rval=rval)

    def rerun(self, tid: int) -> None:
        """At an emulated entry stop: the call runs after all. The thread goes back onto its
        `syscall` instruction and makes it again as a plain stepping thread (entry and exit
        stops), then emulation resumes; a thread no longer stepping just runs it."""
        regs = pt.ptrace_getregs(tid)
        regs.rip, regs.rax = regs.rip - 2, regs.orig_rax
        pt.ptrace_setregs(tid, regs)
        self.run_again(tid)

    def run_again(self, tid: int) -> None:
        """The thread was put back onto its `syscall` instruction (rerun, Injection.finish_rerun):
        let that call run at the next resume, not be emulated away."""
        self.emulating.discard(tid)
        if tid in self.stepping:
            self._rerunning.add(tid)

    def wait_syscall_stop(self, tid: int) -> None:
        """Resume ``tid`` to its next syscall stop, holding back signals that arrive meanwhile."""
        self.resume(tid, every_syscall=True)
        if not self._until_syscall_stop(tid, lambda: self.resume(tid, every_syscall=True)):
            raise TraceeGone(tid)

    # ------------------------------------------------------------ memory

    def _mem_fd(self, tid: int) -> int:
        if tid not in self._mem:
            self._mem[tid] = os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)
        return self._mem[tid]

    def read(self, tid: int, address: int, size: int) -> bytes:
        return os.pread(self._mem_fd(tid), size, address)

    def write(self, tid: int, address: int, data: bytes) -> None:
        if os.pwrite(self._mem_fd(tid), data, address) != len(data):
            raise OSError(errno.EIO, f"short write into process {tid}")
