"""What a person sees on the console during a run, and where everything else goes.

The console shows relayrl's own progress (the driver's INFO lines and the progress bar), relayrl's
warnings and errors from every actor, and any error line (a raised exception, an ERROR line) of any
actor, each with the log file that holds the rest. Everything goes in full to
``<run_dir>/logs/<component>.log``: ``driver.log`` (the driver's Python logging) and one file per actor
class (``RolloutWorker.log``, ``LearnerWorker.log``, ...: vLLM's, DeepSpeed's and Ray's output of that
actor, from every node). ``relayrl -v`` puts everything back on the console.

How: actors keep streaming their stdout/stderr to the driver (Ray's ``log_to_driver``, which works
across nodes); on the driver, Ray's printer of those lines (a handler of
``ray._private.ray_logging.global_worker_stdstream_dispatcher`` named ``ray_print_logs``) is
replaced by `WorkerLogRouter`. That is a private Ray API: `route_worker_logs` checks for it and, when
it is gone, warns once and leaves Ray's default printing in place (``tests/unit/test_console.py``
pins it). Actors format their Python logging like the driver (`setup_worker_logging`, Ray's
``worker_process_setup_hook``) so relayrl's own lines can be told apart.

Left out on purpose: lines the driver's C++ core worker writes straight to the process's stderr (a
few Ray notices), Ray's own session logs (under Ray's temp dir), the raylet's and autoscaler's
lines (printed as Ray prints them), and log rotation.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RELAYRL_LOGGERS = ("relayrl", "orchestrator", "rollout", "learner", "buffer", "base", "tooling")
WORKER_SETUP_HOOK = "orchestrator.console.setup_worker_logging"
RAY_PRINT_HANDLER = "ray_print_logs"  # the name Ray's connect() gives its printer in the dispatcher

# a WARNING or worse from one of relayrl's loggers in an actor (formatted by `setup_worker_logging`)
_OWN_WARNING = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (%s)[.:]" % "|".join(RELAYRL_LOGGERS))
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)(\([\w.]*\))?(:|$)")  # a traceback's last line
_ERROR_LINE = re.compile(
    r"^Exception raised in creation task"  # Ray: an actor's __init__ raised
    r"|" + _EXCEPTION_LINE.pattern +
    r"|\b(ERROR|CRITICAL|FATAL)\b"  # an error logged by anyone (Python logging, vLLM)
    r"|^\[[^\]]* [EF] \d+ \d+\] \S+:\d+: (?!\s*@ |Stack trace)"  # Ray's C++ core (not its stack frames)
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_logs_dir: Path | None = None  # the run's logs dir, once `log_to_files` is called
_router: WorkerLogRouter | None = None  # the driver's actor-output router, once `route_worker_logs` installed it


class _ConsoleFilter(logging.Filter):
    """relayrl's own loggers from INFO up; everyone else's from ERROR up. A record logged with
    ``extra={"console": False}`` goes to the log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        own = record.name.split(".")[0] in RELAYRL_LOGGERS
        return record.levelno >= (logging.INFO if own else logging.ERROR)


class _CurrentStderr(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is when the record is emitted, like logging's own last-resort
    handler: a `main` called inside a process whose ``sys.stderr`` is later swapped and closed (a test runner's
    capture, a notebook cell) leaves no handler on a closed stream ("I/O operation on closed file")."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.stderr


def setup_console(verbose: bool) -> None:
    """The driver's Python logging on stderr: everything (``verbose``), else `_ConsoleFilter`'s choice."""
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    if not verbose:
        handler.addFilter(_ConsoleFilter())
    _replace_root_handler("relayrl-console", handler)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)


def _replace_root_handler(name: str, handler: logging.Handler) -> None:
    """Install ``handler`` on the root logger in place of an earlier one of the same name (a second
    `main` call in one process); other handlers (a test runner's) stay."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == name]:
        root.removeHandler(old)
        old.close()
    handler.set_name(name)
    root.addHandler(handler)


def log_to_files(logs_dir: Path) -> Path:
    """Also write the driver's logging, in full, to ``logs_dir/driver.log`` (appended on resume);
    returns ``logs_dir``."""
    global _logs_dir
    logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs_dir / "driver.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    _replace_root_handler("relayrl-driver-log", handler)
    _logs_dir = logs_dir
    return logs_dir


def quiet_ray_logger() -> None:
    """Send Ray's driver-side Python logger (which prints on its own handler, e.g. "Started a local
    Ray instance") through the root handlers: the console filter and ``driver.log``. Call after
    ``import ray`` and before ``ray.init``."""
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers = [h for h in ray_logger.handlers if isinstance(h, logging.FileHandler)]
    ray_logger.propagate = True


def setup_worker_logging() -> None:
    """Ray ``worker_process_setup_hook`` of every actor process: Python logging at INFO on stderr in
    the driver's format, so relayrl's own warnings are recognised on the driver."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)


def component_log(logs_dir: Path, component: str) -> Path:
    """The log file of ``component`` (an actor class name, ``driver``, ...) under ``logs_dir``."""
    return logs_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', component)[:100] or 'worker'}.log"


class WorkerLogRouter:
    """Replaces Ray's printer of actor output on the driver: appends each batch of lines to its
    component's log file and prints only relayrl's own warnings and error lines, naming the file.

    Args:
        logs_dir: the run's logs dir.
        verbose: also print everything as Ray does (through ``ray_print``).
        ray_print: Ray's own printer; it still prints the raylet's and autoscaler's lines.
    """

    def __init__(self, logs_dir: Path, verbose: bool, ray_print) -> None:
        self.logs_dir, self.verbose, self.ray_print = logs_dir, verbose, ray_print
        self._files: dict[Path, object] = {}
        self._lock = threading.Lock()
        self.last_batch = time.monotonic()

    def wait_quiet(self, quiet_s: float = 1.0, max_s: float = 5.0) -> None:
        """Block until no actor output arrived for ``quiet_s`` seconds (at most ``max_s``): Ray streams an
        actor's last lines (its traceback) to the driver asynchronously, after the driver saw the error."""
        start = time.monotonic()
        while time.monotonic() - start < max_s:
            if time.monotonic() - max(self.last_batch, start) >= quiet_s:
                return
            time.sleep(0.1)

    def __call__(self, batch: dict) -> None:
        self.last_batch = time.monotonic()
        if batch.get("pid") in ("raylet", "autoscaler"):
            self.ray_print(batch)
            return
        component = batch.get("actor_name") or batch.get("task_name") or "worker"
        path = component_log(self.logs_dir, component)
        where = f"pid={batch.get('pid')}"
        if batch.get("ip") and batch.get("ip") != batch.get("localhost"):
            where += f", ip={batch['ip']}"
        lines = batch.get("lines") or []
        if not lines:
            return
        with self._lock:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = open(path, "a", encoding="utf-8")
            f.writelines(f"({where}) {line}\n" for line in lines)
            f.flush()
        if self.verbose:
            self.ray_print(batch)
            return
        shown = [line for line in lines if _OWN_WARNING.search(line) or _ERROR_LINE.search(line)]
        if shown:
            try:
                shown_path = path.relative_to(Path.cwd())
            except ValueError:
                shown_path = path
            _write("".join(f"({component} {where}) {_ANSI.sub('', line)}  [full log: {shown_path}]\n"
                           for line in shown))

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def _write(text: str) -> None:
    """Print ``text`` on stderr without tearing the progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr, end="")
    except ImportError:
        sys.stderr.write(text)


def route_worker_logs(logs_dir: Path, verbose: bool) -> WorkerLogRouter | None:
    """Route actor output on this (connected) driver through a `WorkerLogRouter`; returns it.

    Returns None, after one warning, when Ray's printing hook is not where this Ray version keeps it:
    actor output is then printed as Ray prints it.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        ray_print = dict(dispatcher.handlers)[RAY_PRINT_HANDLER]
        router = WorkerLogRouter(logs_dir, verbose, ray_print)
        # same name: Ray's disconnect() removes it again
        dispatcher.remove_handler(RAY_PRINT_HANDLER)
        dispatcher.add_handler(RAY_PRINT_HANDLER, router)
        global _router
        _router = router
    except (ImportError, AttributeError, KeyError, TypeError, ValueError) as e:
        logger.warning("actor output stays on the console, not in %s: Ray's log printing hook %r is missing "
                       "(%s: %s); is this the Ray version relayrl pins?", logs_dir, RAY_PRINT_HANDLER,
                       type(e).__name__, e)
        return None
    return router


def error_line(e: BaseException) -> str:
    """One line for a run that ended with ``e``. For an error raised in an actor (a Ray error, whose
    text is the remote traceback): the exception, where it was raised and that actor's log file.
    The full traceback goes to ``driver.log`` once a run has one."""
    text = str(e)
    if _router is not None:  # the actor's own error lines first, then this one
        _router.wait_quiet()
    if type(e).__module__.startswith("ray."):
        plain = _ANSI.sub("", text)  # Ray colours the task name
        lines = [x.strip() for x in plain.splitlines() if x.strip()]
        raised = [x for x in lines if _EXCEPTION_LINE.match(x)]
        text = raised[-1] if raised else (lines[0] if lines else type(e).__name__)
        where = re.search(r"ray::([\w.]+)\(\) \(pid=(\d+)", "\n".join(lines))
        if where:
            text += f" (raised in {where[1]}, pid={where[2]})"
            if _logs_dir is not None:
                text += f"; full log: {component_log(_logs_dir, where[1].split('.')[0])}"
        elif _logs_dir is not None:
            text += f"; full logs: {_logs_dir}"
    if _logs_dir is not None:
        logger.error("run failed", exc_info=e, extra={"console": False})
    return text
