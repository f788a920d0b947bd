"""The console and the run's log files (`orchestrator.console`), without starting Ray: which lines
reach the console, which only the files, and the pin on Ray's private printing hook."""

from __future__ import annotations

import inspect
import logging

import pytest

from orchestrator import console

VLLM_INFO = "(MainProcess pid=7) INFO 12-02 14:02:14 [model.py:733] Resolved architecture: LlamaForCausalLM"
VLLM_WARNING = ("(MainProcess pid=7) WARNING 12-02 14:02:15 [utils.py:333] Attempted to load weight norm.weight "
                "with dtype torch.float32 into parameter with dtype torch.bfloat16")
OWN_INFO = "2026-12-02 14:05:38,537 INFO rollout.engine: vLLM engine up in 3.2 s"
OWN_WARNING = "2026-12-02 14:05:38,537 WARNING rollout.worker: reward function failed on 1 sample"
TRACEBACK = ["Exception raised in creation task: The actor died because of an error raised in its creation task",
             "Traceback (most recent call last):", '  File "rollout/worker.py", line 3, in __init__',
             "    raise ValueError('max_model_len too large')", "ValueError: max_model_len too large"]


def _batch(lines, actor="RolloutWorker", pid="7", is_err=True):
    return {"actor_name": actor, "task_name": "", "pid": pid, "ip": "10.0.0.2", "localhost": "10.0.0.2",
            "is_err": is_err, "lines": lines, "job": "01000000"}


@pytest.fixture
def root_logging():
    """Leave the process's logging (and the console's run state) as it was."""
    import ray  # noqa: F401 (Ray's logger gets its own handler on import)

    root, ray_logger = logging.getLogger(), logging.getLogger("ray")
    saved = root.handlers[:], root.level, console._logs_dir, ray_logger.handlers[:], ray_logger.propagate
    yield
    for h in root.handlers:
        if h not in saved[0]:
            h.close()
    root.handlers[:] = saved[0]
    _, root.level, console._logs_dir, ray_logger.handlers, ray_logger.propagate = saved


def test_ray_print_hook_is_where_the_console_expects_it():
    """Pin on Ray's private API: if this fails after a Ray upgrade, `route_worker_logs` falls back to
    Ray's own printing (actor output back on the console); update `orchestrator.console` to the new hook."""
    import ray._private.log_monitor as log_monitor
    import ray._private.worker as worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    assert callable(dispatcher.add_handler) and callable(dispatcher.remove_handler)
    assert isinstance(dispatcher.handlers, list)
    connect = inspect.getsource(worker.connect)
    assert f'"{console.RAY_PRINT_HANDLER}"' in connect and "print_to_stdstream" in connect
    assert f'remove_handler("{console.RAY_PRINT_HANDLER}")' in inspect.getsource(worker.disconnect)
    published = inspect.getsource(log_monitor.LogMonitor)
    for key in ("actor_name", "task_name", "pid", "ip", "is_err", "lines"):
        assert f'"{key}"' in published, key


def test_router_files_everything_and_shows_only_own_warnings_and_errors(tmp_path, capsys):
    printed = []
    router = console.WorkerLogRouter(tmp_path, verbose=False, ray_print=printed.append)
    router(_batch([VLLM_INFO, VLLM_WARNING, OWN_INFO, OWN_WARNING]))
    router(_batch(TRACEBACK))
    router(_batch(["Loading weights: 100%"], actor="LearnerWorker", pid="8", is_err=False))
    router(_batch(["[2026-12-02 14:06:50,085 E 27 27] logging.cc:474:     @     0x7f045dca8eec  (unknown)"]))
    router(_batch([], actor="ReplayBuffer"))
    router({**_batch(["Autoscaler status"]), "pid": "autoscaler", "actor_name": ""})
    router.close()
    err = capsys.readouterr().err.splitlines()
    log = tmp_path / "RolloutWorker.log"
    assert err == [f"(RolloutWorker pid=7) {x}  [full log: {log}]" for x in (OWN_WARNING, TRACEBACK[0], TRACEBACK[-1])]
    filed = [f"(pid=7) {x}" for x in (VLLM_INFO, VLLM_WARNING, OWN_INFO, OWN_WARNING)]
    assert log.read_text().splitlines()[:4] == filed
    assert len(log.read_text().splitlines()) == 4 + len(TRACEBACK) + 1
    assert (tmp_path / "LearnerWorker.log").read_text() == "(pid=8) Loading weights: 100%\n"
    assert not (tmp_path / "ReplayBuffer.log").exists()  # nothing said, no file
    assert [b["pid"] for b in printed] == ["autoscaler"]  # the raylet's and autoscaler's lines: as Ray prints them


def test_verbose_router_also_prints_everything_as_ray_does(tmp_path, capsys):
    printed = []
    router = console.WorkerLogRouter(tmp_path, verbose=True, ray_print=printed.append)
    router(_batch([VLLM_INFO, *TRACEBACK]))
    router.close()
    assert [b["lines"] for b in printed] == [[VLLM_INFO, *TRACEBACK]] and capsys.readouterr().err == ""
    assert VLLM_INFO in (tmp_path / "RolloutWorker.log").read_text()


def test_missing_ray_hook_falls_back_to_ray_printing_with_one_warning(tmp_path, monkeypatch, caplog):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.setattr(dispatcher, "handlers", [("some_other_printer", print)])  # a Ray without the hook
    with caplog.at_level(logging.WARNING, logger="orchestrator.console"):
        assert console.route_worker_logs(tmp_path, verbose=False) is None
    assert dispatcher.handlers == [("some_other_printer", print)]  # Ray's printing untouched
    assert len(caplog.records) == 1 and "ray_print_logs" in caplog.text and "stays on the console" in caplog.text


def test_route_replaces_ray_printer_under_the_same_name(tmp_path, monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", print)])
    router = console.route_worker_logs(tmp_path, verbose=False)
    assert dispatcher.handlers == [("ray_print_logs", router)] and router.ray_print is print


def test_driver_console_keeps_relayrl_info_and_everyones_errors(tmp_path, capsys, root_logging):
    console.setup_console(verbose=False)
    console.log_to_files(tmp_path / "logs")
    console.quiet_ray_logger()
    logging.getLogger("relayrl").info("run dir x")
    logging.getLogger("orchestrator.checkpoint").warning("slow checkpoint")
    logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
    logging.getLogger("urllib3").warning("retrying")
    logging.getLogger("filelock").error("lock lost")
    logging.getLogger("relayrl").error("traceback for the file", extra={"console": False})
    err = capsys.readouterr().err
    assert "run dir x" in err and "slow checkpoint" in err and "lock lost" in err
    assert "Started a local Ray" not in err and "retrying" not in err and "traceback for the file" not in err
    log = (tmp_path / "logs" / "driver.log").read_text()
    for needle in ("run dir x", "slow checkpoint", "Started a local Ray", "retrying", "lock lost", "traceback for"):
        assert needle in log, needle


def test_console_writes_to_the_current_stderr_not_a_closed_one(monkeypatch, root_logging):
    """A second `main` in one process (tests, notebooks) after the first one's stderr was swapped and closed."""
    import io

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    console.setup_console(verbose=False)
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    logging.raiseExceptions, saved = True, logging.raiseExceptions
    try:
        logging.getLogger("relayrl").info("after the swap")
    finally:
        logging.raiseExceptions = saved
    out = second.getvalue()
    assert "INFO relayrl: after the swap" in out and "Logging error" not in out, out


def test_error_raised_in_an_actor_is_one_line_naming_its_log(tmp_path, root_logging):
    import ray.exceptions

    console.setup_console(verbose=False)
    logs = console.log_to_files(tmp_path / "logs")
    remote_tb = 'Traceback (most recent call last):\n  File "w.py", line 1\nValueError: bad reward'
    e = ray.exceptions.RayTaskError("RolloutWorker.generate", remote_tb, ValueError("bad reward"),
                                    proctitle="ray::RolloutWorker.generate", pid=42, ip="10.0.0.2")
    e = e.as_instanceof_cause()  # as ray.get raises it
    line = console.error_line(e)
    where = f"(raised in RolloutWorker.generate, pid=42); full log: {logs}/RolloutWorker.log"
    assert line == f"ValueError: bad reward {where}"
    assert "w.py" in (logs / "driver.log").read_text()  # the whole remote traceback is kept


def test_every_package_of_the_project_logs_as_relayrl():
    """A package added to pyproject's list (base/, tooling/, ...) has its warnings shown as relayrl's own."""
    import tomllib
    from pathlib import Path

    from orchestrator.console import RELAYRL_LOGGERS

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(RELAYRL_LOGGERS), sorted(packages - set(RELAYRL_LOGGERS))
