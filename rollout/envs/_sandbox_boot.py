"""Started by `rollout.envs.sandbox` as root (or as the worker's user): isolate, limit, drop to an
unprivileged user, exec the tool's interpreter. Not imported by relayrl; argv[1] is a JSON spec.

With isolation: new mount, network and PID namespaces; every mount but the tool's own directory is
remounted read-only; the tool runs as a child of the namespace's PID 1, so when this process dies the kernel kills every
process the tool started. Exit status: the tool's, or 128 + signal number.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x40000000, 0x20000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def _mount(libc, src: bytes, target: bytes, flags: int) -> int:
    return libc.mount(src, target, None, flags, None)


def _isolate(work: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if _mount(libc, b"none", b"/", MS_REC | MS_PRIVATE) != 0 or _mount(libc, work.encode(), work.encode(), MS_BIND):
        raise OSError(ctypes.get_errno(), "mount")
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for t in targets:
        if t != work:  # best effort for special mounts (proc, sysfs): they are not writable by the tool's user
            _mount(libc, b"none", t.encode(), MS_REMOUNT | MS_BIND | MS_RDONLY)


def _limit_and_exec(spec: dict) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_seconds"], spec["cpu_seconds"] + 1))  # SIGXCPU, then KILL
    for name, value in (("RLIMIT_AS", spec["memory_bytes"]),
                        ("RLIMIT_NPROC", spec["max_processes"]), ("RLIMIT_FSIZE", spec["max_output_bytes"] + 1),
                        ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", 64)):
        resource.setrlimit(getattr(resource, name), (value, value))
    if spec["isolate"]:
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])
    os.chdir(spec["work"])
    env = {"PATH": "/usr/bin:/bin", "HOME": spec["work"], "TMPDIR": spec["work"], "LANG": "C.UTF-8"}
    os.execve(spec["python"], [spec["python"], "-I", "-B", "main.py"], env)


def _start(spec: dict) -> None:
    """`_limit_and_exec`, or a one-line report (sandbox.BOOT_FAILED) and exit status 127."""
    try:
        _limit_and_exec(spec)
    except OSError as e:
        sys.stderr.write(f"relayrl sandbox: could not start the tool: {e}\n")
        sys.stderr.flush()
    os._exit(127)


def main() -> None:
    spec = json.loads(sys.argv[1])
    if not spec["isolate"]:
        _start(spec)
    try:
        _isolate(spec["work"])
    except OSError as e:
        sys.stderr.write(f"relayrl sandbox: could not isolate the tool: {e}\n")
        sys.exit(127)
    pid = os.fork()
    if pid == 0:  # the init of the new PID namespace: runs the tool as its child (init ignores SIGXCPU)
        child = os.fork()
        if child == 0:
            _start(spec)
        os._exit(_wait(child))
    sys.exit(_wait(pid))


def _wait(pid: int) -> int:
    """Exit status of child ``pid``: its code, or 128 + the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    main()
