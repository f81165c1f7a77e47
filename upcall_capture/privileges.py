"""-Z USER: give up root once the probe is attached and the output is open, as tcpdump does.

Unlike tcpdump, the capture still makes bpf() calls after that (it reads the probe's
counters and stops the probe), which an unprivileged process may not do where
kernel.unprivileged_bpf_disabled is set. So the capturing process keeps CAP_BPF and
CAP_PERFMON across the change of user, and nothing else. A root parent waits for it,
only to remove the uprobes at the end.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import signal
import sys
from collections.abc import Callable

from upcall_capture.errors import UsageError

_PR_SET_KEEPCAPS = 8
_CAPABILITY_VERSION_3 = 0x20080522
_CAP_PERFMON = 38
_CAP_BPF = 39


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def user_ids(name: str) -> tuple[int, int]:
    """(uid, gid) of a user name or number; a UsageError when there is no such user."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise UsageError(f"-Z: no such user: {name}") from None
    return entry.pw_uid, entry.pw_gid


def drop_to(uid: int, gid: int) -> None:
    """Become uid/gid, keeping only CAP_BPF and CAP_PERFMON."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        if libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        kept = (1 << (_CAP_BPF - 32)) | (1 << (_CAP_PERFMON - 32))
        header = _CapHeader(_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)(_CapData(0, 0, 0), _CapData(kept, kept, 0))
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    except OSError as err:
        raise UsageError(f"-Z: cannot drop privileges: {os.strerror(err.errno or 1)}") from None


def run_as(uid: int, gid: int, work: Callable[[], int]) -> int:
    """Run work() in a child that has dropped to uid/gid; return its exit status.

    The parent stays root only to wait, pass signals on, and let the caller detach the
    probe afterwards: bcc removes its uprobes through tracefs, which needs root.
    """
    child = os.fork()
    if child == 0:
        status = 1
        try:
            drop_to(uid, gid)
            status = work()
        except UsageError as err:
            print(f"upcall-capture: {err}", file=sys.stderr)
            status = err.exit_status
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)  # not the parent's exit handlers (bcc's cleanup among them)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: os.kill(child, signum))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            return os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
