"""Run model-written Python in a sandboxed subprocess and turn whatever happens into a `ToolResult`.

The tool's code runs in a fresh temporary directory (its cwd and HOME, removed afterwards) with an
environment holding only PATH, HOME, TMPDIR and LANG (none of the worker's variables, so none of its
secrets), under rlimits on CPU seconds, address space, processes and file size (which also bounds its
output). Where the platform allows (root or CAP_SYS_ADMIN) it also gets its own network namespace (no
network at all, not even loopback to the host), its own mount namespace with every mount but its
directory read-only, its own PID namespace (all its processes die with it) and an unprivileged user id.
`sandbox_isolation` says which of the two applies; `SandboxConfig.require_isolation` refuses the weaker one.

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


@functools.lru_cache(maxsize=8)
def sandbox_isolation(python: str = sys.executable) -> str:
    """``"namespaces"`` when this process may create namespaces and switch user (tools then run fully
    isolated), else ``"rlimits"``. Probed once per interpreter with a throwaway ``unshare``."""
    try:
        probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "true"], capture_output=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "rlimits"
    return "namespaces" if probe.returncode == 0 and os.geteuid() == 0 else "rlimits"


def resolve_python(cfg: SandboxConfig) -> str:
    """The interpreter tool code runs with (``cfg.python``, or for ``auto`` /usr/bin/python3 when present)."""
    if cfg.python != "auto":
        return cfg.python
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def check_sandbox(cfg: SandboxConfig) -> str:
    """Fail at start-up, not at the first tool call: returns the isolation level (see `sandbox_isolation`).

    Raises:
        RuntimeError: isolation is required but unavailable, or the interpreter cannot run a trivial
            program inside the sandbox (the message names the interpreter and the setting to change).
    """
    level = sandbox_isolation()
    if level != "namespaces" and cfg.require_isolation:
        raise RuntimeError("tool sandbox: this process cannot create network/mount/PID namespaces and switch "
                           "user (needs root or CAP_SYS_ADMIN); run the rollout workers as root or set "
                           "rollout.env.sandbox.require_isolation = false (rlimits and a scrubbed environment only)")
    res = run_python("print(6 * 7)", cfg)
    if res.output.strip() != "42":
        raise RuntimeError(f"tool sandbox: interpreter {resolve_python(cfg)!r} did not run a trivial program "
                           f"({res.failure}: {res.output.strip()[-300:]!r}); set rollout.env.sandbox.python to an "
                           f"interpreter user {cfg.uid} may execute")
    return level


def run_python(code: str, cfg: SandboxConfig) -> ToolResult:
    """Run ``code`` (Python source) in the sandbox; never raises for anything the code does.

    Args:
        code: program text; its stdout/stderr are the result.
        cfg: limits (seconds, bytes, processes) and the interpreter.

    Returns:
        A `ToolResult`; ``failure == "sandbox"`` when the sandbox could not start (e.g. no temporary
        directory could be made).
    """
    t0 = time.monotonic()
    isolate = sandbox_isolation() == "namespaces"
    try:
        work = tempfile.mkdtemp(prefix="relayrl-tool-")
    except OSError as e:
        return ToolResult(False, f"{type(e).__name__}: {e}", "sandbox", time.monotonic() - t0)
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if isolate:
            os.chown(work, cfg.uid, cfg.uid)
            os.chmod(work, 0o700)
        spec = {"work": work, "python": resolve_python(cfg), "isolate": isolate, "uid": cfg.uid,
                "cpu_seconds": cfg.cpu_seconds, "memory_bytes": cfg.memory_bytes,
                "max_processes": cfg.max_processes, "max_output_bytes": cfg.max_output_bytes}
        out_path = os.path.join(work, ".out")
        with open(out_path, "wb") as out:
            status, timed_out = _run_boot(spec, out, cfg.wall_seconds)
        with open(out_path, "rb") as f:
            raw = f.read(cfg.max_output_bytes + 1)
    except OSError as e:
        return ToolResult(False, f"{type(e).__name__}: {e}", "sandbox", time.monotonic() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = raw[: cfg.max_output_bytes].decode("utf-8", errors="replace")
    status = 128 - status if status < 0 else status  # killed by a signal, directly or through the bootstrap
    if timed_out:
        failure = "timeout"
    elif status == 128 + signal.SIGXCPU:
        failure = "cpu_limit"
    elif status == 128 + signal.SIGXFSZ or len(raw) > cfg.max_output_bytes:
        failure = "output_limit"
    elif status == 127 and text.startswith(BOOT_FAILED):
        failure = "sandbox"
    elif status > 128:
        failure = "killed"
    elif status != 0:
        failure = "error"
    else:
        failure = ""
    return ToolResult(not failure, text, failure, time.monotonic() - t0)


def _run_boot(spec: dict, out, wall_seconds: float) -> tuple[int, bool]:
    """Start the bootstrap in a session of its own; kill the whole session past ``wall_seconds``.
    Returns ``(exit status, timed out)``."""
    proc = subprocess.Popen([sys.executable, "-I", _BOOT, json.dumps(spec)], stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"},
                            start_new_session=True, close_fds=True)
    try:
        return proc.wait(timeout=wall_seconds), False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return proc.returncode, True
