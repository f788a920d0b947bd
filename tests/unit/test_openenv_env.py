"""The ``openenv`` environment against a real OpenEnv server: the echo environment that openenv-core's own
``openenv init`` writes, served by openenv's ``create_app`` under uvicorn on localhost (no network, no Docker).

openenv-core is the ``openenv`` extra, which ``make install`` installs; where it is missing (a ``pip install``
without that extra) the server tests skip and the option checks still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from ports import free_port

from buffer import Problem
from rollout.envs import EnvConfig, make_environment

PROBLEM = Problem("train/0", "", "")


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    """The URL of the generated echo environment's server (up to 60 s to start: it imports gradio)."""
    pytest.importorskip("openenv.core.generic_client")
    root = tmp_path_factory.mktemp("openenv")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    subprocess.run([sys.executable, "-m", "openenv.cli", "init", "echo_env", "-o", str(root)], env=env, check=True,
                   capture_output=True, timeout=60)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "echo_env.server.app:app", "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "error"], env=env, cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the echo server did not start (exit code {server.poll()})") from None
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_echo_episode_turn_by_turn(echo_server):
    cfg = EnvConfig(type="openenv", max_turns=3, options={"base_url": echo_server, "instruction": "Say something."})
    env = make_environment(cfg, PROBLEM)
    try:
        opening = env.reset(7)
        assert opening == [{"role": "user", "content": "echoed_message: Echo Env environment ready!\n"
                                                       "message_length: 0\nSay something."}]
        first = env.step("hello")
        assert first.observation == [{"role": "user", "content": "echoed_message: hello\nmessage_length: 5"}]
        assert first.reward == pytest.approx(0.5) and not first.done  # the echo env's reward: 0.1 per character
        second = env.step("a longer turn")
        assert second.observation[0]["content"].startswith("echoed_message: a longer turn\n")
        assert second.reward == pytest.approx(1.3) and not second.done
    finally:
        env.close()


def test_observation_field_and_refused_action_name_the_fields(echo_server):
    one_field = make_environment(EnvConfig(type="openenv", options={"base_url": echo_server,
                                                                    "observation_field": "echoed_message"}), PROBLEM)
    try:
        assert one_field.reset(0)[0]["content"] == "Echo Env environment ready!"
        assert one_field.step("hi").observation == [{"role": "user", "content": "hi"}]
    finally:
        one_field.close()
    wrong = make_environment(EnvConfig(type="openenv", options={"base_url": echo_server, "action_field": "text"}),
                             PROBLEM)
    try:
        wrong.reset(0)
        with pytest.raises(RuntimeError, match=r"refused the action with fields \['text'\]"):
            wrong.step("hi")
    finally:
        wrong.close()
    missing = make_environment(EnvConfig(type="openenv", options={"base_url": echo_server,
                                                                  "observation_field": "board"}), PROBLEM)
    try:
        with pytest.raises(ValueError, match=r"'board' is not in the OpenEnv observation \(fields: \['echoed_"):
            missing.reset(0)
    finally:
        missing.close()


def test_options_and_missing_package_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="needs rollout.env.options.base_url"):
        make_environment(EnvConfig(type="openenv"), PROBLEM)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['url'\]"):
        make_environment(EnvConfig(type="openenv", options={"url": "http://x"}), PROBLEM)
    monkeypatch.setitem(sys.modules, "openenv", None)  # as if openenv-core were not installed
    monkeypatch.setitem(sys.modules, "openenv.core.generic_client", None)
    with pytest.raises(ValueError, match=r"install it with: pip install 'relayrl\[openenv\]'"):
        make_environment(EnvConfig(type="openenv", options={"base_url": "http://localhost:8000"}), PROBLEM)
