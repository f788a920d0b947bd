"""The tool sandbox holds against hostile tool code, and every failure comes back as an observation.

Real subprocesses, real namespaces and rlimits (these tests run as root, like CI; without root the
isolation tests are skipped and `check_sandbox` refuses to run tools unless told otherwise).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest

from rollout.envs import SandboxConfig, ToolCall, parse_tool_calls, run_python, run_tool_call
from rollout.envs.sandbox import check_sandbox, sandbox_isolation

CFG = SandboxConfig(cpu_seconds=1, wall_seconds=4.0, memory_bytes=128 << 20, max_processes=8, max_output_bytes=512)
isolated = pytest.mark.skipif(sandbox_isolation() != "namespaces", reason="needs root (namespaces, setuid)")


def test_plain_code_runs_and_check_passes():
    r = run_python("import math\nprint(math.factorial(5))", CFG)
    assert (r.ok, r.output.strip(), r.failure) == (True, "120", "")
    assert check_sandbox(CFG) == sandbox_isolation()


def test_secret_in_the_workers_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("RELAYRL_TEST_SECRET", "s3cr3t-value-7781")
    code = ("import os\nprint(sorted(os.environ))\nprint(os.environ.get('RELAYRL_TEST_SECRET'))\n"
            "for p in (os.getppid(), 1):\n"
            "    try: print(open(f'/proc/{p}/environ').read())\n"
            "    except OSError as e: print('denied', e.errno)\n")
    r = run_python(code, CFG)
    assert "s3cr3t-value-7781" not in r.output
    assert r.output.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"


@isolated
def test_no_network_not_even_the_hosts_loopback():
    server = socket.create_server(("127.0.0.1", 0))
    port, accepted = server.getsockname()[1], []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('CONNECTED')",
                   CFG)
    server.close()
    assert not r.ok and r.failure == "error" and "CONNECTED" not in r.output and not accepted
    assert "Network is unreachable" in r.observation() and "[the tool failed]" in r.observation()


@isolated
def test_writes_outside_its_directory_fail(tmp_path):
    targets = [str(tmp_path / "escaped.txt"), "/tmp/relayrl-escaped.txt", "/dev/shm/relayrl-escaped.txt"]
    code = ("import os\nopen('mine.txt', 'w').write('ok'); print('own dir ok')\n"
            f"for p in {targets!r}:\n"
            "    try: open(p, 'w').write('x'); print('WROTE', p)\n"
            "    except OSError as e: print('refused', p, e.strerror)\n")
    r = run_python(code, CFG)
    assert r.ok and "own dir ok" in r.output and "WROTE" not in r.output, r.output
    assert not any(os.path.exists(p) for p in targets)


@isolated
def test_fork_bomb_is_contained_and_leaves_no_process():
    stubborn = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n"
    r = run_python(stubborn, CFG)
    assert not r.ok and r.failure in ("timeout", "cpu_limit"), r
    deadline = time.monotonic() + 10  # the kernel tears the PID namespace down asynchronously
    while (left := subprocess.run(["pgrep", "-u", str(CFG.uid)], capture_output=True, text=True).stdout.split()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert left == [], f"processes of the tool's user left behind: {left}"
    r = run_python("import os\nwhile True:\n    os.fork()\n", CFG)
    assert not r.ok and "BlockingIOError" in r.observation()


def test_memory_cpu_time_output_and_crashes_become_observations():
    cases = {"x = bytearray(1 << 30)": ("error", "MemoryError"),
             "while True: pass": ("cpu_limit", "CPU-time limit"),
             "import time; time.sleep(60)": ("timeout", "time limit"),
             "print('y' * 100000)": ("output_limit", "size limit"),
             "raise ValueError('boom')": ("error", "ValueError: boom"),
             "import os; os.kill(os.getpid(), 9)": ("killed", "killed by a signal")}
    for code, (failure, text) in cases.items():
        # a generous wall clock for the CPU-limit case: on a loaded machine 1 CPU second can take > 4 s
        r = run_python(code, CFG.model_copy(update={"wall_seconds": 60.0}) if failure == "cpu_limit" else CFG)
        assert (r.ok, r.failure) == (False, failure) and text in r.observation(), (code, r)
        assert len(r.output.encode()) <= CFG.max_output_bytes + 4  # bounded (replacement chars aside)
    garbage = run_python("import sys; sys.stdout.buffer.write(bytes(range(256)))", CFG)
    assert garbage.ok and "\ufffd" in garbage.output  # undecodable bytes replaced, not raised


def test_tool_calls_parse_and_malformed_calls_are_observations():
    text = ('Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "17 * 23"}}</tool_call>'
            '<tool_call>{"name": "python", "arguments": {"code": "print(2 ** 8)"}}</tool_call>'
            '<tool_call>{not json}</tool_call><tool_call>["x"]</tool_call>')
    calls = parse_tool_calls(text)
    assert [c.name for c in calls[:2]] == ["calculator", "python"] and calls[2].error and calls[3].error
    outs = [run_tool_call(c, CFG) for c in calls]
    assert [o.ok for o in outs] == [True, True, False, False]
    assert outs[0].output.strip() == "391" and outs[1].output.strip() == "256"
    assert "not valid JSON" in outs[2].observation()
    assert not run_tool_call(ToolCall("shell", {"cmd": "ls"}), CFG).ok
    assert "needs a string argument 'code'" in run_tool_call(ToolCall("python", {"code": 3}), CFG).output
    esc = run_tool_call(ToolCall("calculator", {"expression": "__import__('os').system('id')"}), CFG)
    assert not esc.ok and "NameError" in esc.output
