"""The README's "Serve" section, run as written, then a graceful SIGTERM with requests in flight.

The section's blocks run in order: the `jaxinfer serve` line starts the server in a subprocess
(its `configs/*.yaml` swapped for a copy pointing at the tiny checkpoint, as tests/test_readme.py
does, and the README's port 8000 for a free one), the curl line runs through the shell (the
answer must be a completion), and the Python block through exec() with the official client.
Then SIGTERM while streamed requests are still generating: the server must stop accepting
connections, finish them all (the grace period), and exit 0.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.server.conftest import Server, free_port, start_server
from tests.test_readme import CONFIG_PATH, ROOT, tiny_copy

README_ADDRESS = "127.0.0.1:8000"


def serve_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Serve\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


def _lines(code: str) -> list[str]:
    return [line for line in code.splitlines() if line.strip()]


def test_readme_serve_section_runs(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = serve_blocks()
    assert [language for language, _ in blocks] == ["bash", "bash", "python"]
    (command,) = _lines(blocks[0][1])
    args = shlex.split(command)
    assert args[:2] == ["jaxinfer", "serve"]
    args = [
        str(tiny_copy(a, tiny_llama, tmp_path)) if CONFIG_PATH.fullmatch(a) else a for a in args[2:]
    ]
    server = start_server(args, tmp_path / "server.log", port=free_port())
    address = server.url.removeprefix("http://")
    try:
        (curl,) = _lines(blocks[1][1])
        assert curl.startswith("curl ")
        done = subprocess.run(
            curl.replace(README_ADDRESS, address), shell=True, capture_output=True, text=True,
            timeout=120, check=True,
        )  # fmt: skip
        answer = json.loads(done.stdout)
        assert answer["object"] == "text_completion"
        assert 1 <= answer["usage"]["completion_tokens"] <= 16
        code = blocks[2][1].replace(README_ADDRESS, address)
        exec(compile(code, "README.md (Serve)", "exec"), {"__name__": "__readme__"})  # noqa: S102
        printed = capsys.readouterr().out
        assert printed.count("CompletionUsage(") == 2  # the chat reply's and the stream's
        _sigterm_with_requests_in_flight(server)
    finally:
        server.stop()


def _sigterm_with_requests_in_flight(server: Server) -> None:
    """8 streams of 100 tokens on an engine that runs 4 at a time: SIGTERM once all 8 are
    accepted, when at least half of the work is still to do."""
    body = {"model": "smollm2", "prompt": "Once", "max_tokens": 100, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    results: dict[int, tuple[list[str], float]] = {}
    accepted = threading.Semaphore(0)

    def stream(index: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": "Bearer secret"}) as response:  # fmt: skip
            accepted.release()  # the 200 and its headers: the server is running the request
            lines = list(response.iter_lines())
        results[index] = (lines, time.monotonic())

    readers = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for reader in readers:
        reader.start()
    for _ in readers:
        assert accepted.acquire(timeout=60)
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no new connections
        httpx.get(f"{server.url}/health", timeout=5)
    for reader in readers:
        reader.join(120)
    assert server.process.wait(60) == 0, server.output()
    assert len(results) == 8
    for lines, _ in results.values():
        events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: ") :])["usage"]["completion_tokens"] == 100
    assert max(finished for _, finished in results.values()) > signalled  # really in flight
    assert "Application shutdown complete" in server.output()
