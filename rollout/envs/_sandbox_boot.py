"""The first program of every tool call: set the rlimits, close inherited files, exec the tool's interpreter.

Not imported by relayrl: `rollout.envs.sandbox` passes this file's text to the tool's own interpreter
(``python -I -c <this text> <spec>``), inside bubblewrap's namespaces (or, with ``isolation = "none"``,
directly), so it must run on any Python 3 and use nothing but the standard library. ``sys.argv[1]`` is a
JSON spec: ``python``, ``dir`` (the tool's directory as the tool sees it), ``cpu_seconds``, ``memory_bytes``,
``max_processes``, ``max_output_bytes``; ``sys.argv[2]`` is the file descriptor of a pipe to the sandbox, told
that this program started (so a failure of bubblewrap's own set-up is not taken for the tool's).

The rlimits are set here, inside the sandbox, rather than on bubblewrap: RLIMIT_NPROC counts per user
namespace (Linux >= 5.14), so a limit set after the call's own user namespace exists counts only that call's
processes; set before, it would cap the namespace by every process of the worker's user on the host.
Exit status: 127 with a line starting "relayrl sandbox:" when the tool could not be started, else the
tool's (exec replaces this program).
"""

import json
import os
import resource
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.write(int(sys.argv[2]), b"1")  # "started" to the sandbox (closed below, so the tool cannot write it)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_seconds"], spec["cpu_seconds"] + 1))  # SIGXCPU, then KILL
        for name, value in (("RLIMIT_AS", spec["memory_bytes"]), ("RLIMIT_NPROC", spec["max_processes"]),
                            ("RLIMIT_FSIZE", spec["max_output_bytes"] + 1), ("RLIMIT_CORE", 0),
                            ("RLIMIT_NOFILE", 64)):
            resource.setrlimit(getattr(resource, name), (value, value))
        os.closerange(3, 1 << 16)
        os.chdir(spec["dir"])
        env = {"PATH": "/usr/bin:/bin", "HOME": spec["dir"], "TMPDIR": spec["dir"], "LANG": "C.UTF-8"}
        os.execve(spec["python"], [spec["python"], "-I", "-B", "main.py"], env)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"relayrl sandbox: could not start the tool: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
    os._exit(127)


if __name__ == "__main__":
    main()
