"""`jaxinfer serve` in a subprocess on 127.0.0.1, once per session, on tiny checkpoints.

The generative server runs the tiny Llama with a few small shapes (configs/tiny-cpu-test.yaml's)
and an API key; every module shares it, and tests that need an engine of their own in
this process build it from the same config file, so `LLM.generate` and the server run the same
programs. The process is stopped with SIGTERM at the end and must exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from jaxinfer import LLM
from jaxinfer.config_file import engine_config_from_yaml

API_KEY = "test-key"
MODEL_NAME = "tiny-llama"
# The shapes of configs/tiny-cpu-test.yaml (4 sequences, one decode and one prefill program):
# the README test and other engine tests use them too, so the compiled programs are shared.
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu-test.yaml"
SERVER_CONFIG = {
    key: value
    for key, value in yaml.safe_load(TINY_CONFIG.read_text()).items()
    if key not in ("model", "sampling")
}


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (killed and reported if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server ignored SIGTERM for {timeout} s:\n{self.output()}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    args: list[str], log: Path, timeout: float = 300, port: int | None = None
) -> Server:
    """`python -m jaxinfer.cli serve ARGS --host 127.0.0.1 --port PORT` (default: a free one),
    ready when /health answers 200."""
    port = port or free_port()
    command = [sys.executable, "-m", "jaxinfer.cli", "serve", *args]
    command += ["--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"the server did not answer /health in {timeout} s:\n{server.output()}")


@pytest.fixture(scope="session")
def server_config(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("server") / "tiny-server.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_llama), **SERVER_CONFIG}))
    return path


@pytest.fixture(scope="session")
def server(server_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    args = ["--config", str(server_config), "--served-model-name", MODEL_NAME]
    running = start_server([*args, "--api-key", API_KEY], log)
    yield running
    code = running.stop()
    assert code == 0, f"exit code {code} after SIGTERM:\n{running.output()}"


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    """The official OpenAI client on the shared test server."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def llm(server_config: Path) -> Iterator[LLM]:
    """The offline engine on the server's own config: what the server's answers must equal."""
    with LLM(engine_config_from_yaml(server_config)) as engine:
        yield engine


def extra_field(obj, name: str):
    """A field the OpenAI schema lacks (vLLM's extras: token_ids, stop_reason, ...)."""
    return (obj.model_extra or {})[name]
