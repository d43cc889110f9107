"""`edgetune serve` and `edgetune chat` as a user runs them (subprocesses on the real demo GGUF)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from edgetune.serve import free_port

EDGETUNE = shutil.which("edgetune", path=str(Path(sys.executable).parent)) or "edgetune"


def test_serve_command_answers_and_stops(demo_gguf_path):
    port = free_port()
    env = {**os.environ, "EDGETUNE_API_KEY": "k3y"}
    proc = subprocess.Popen([EDGETUNE, "serve", str(demo_gguf_path), "--port", str(port), "--n-ctx", "512", "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                req = urllib.request.Request(base + "/models", headers={"Authorization": "Bearer k3y"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    models = json.loads(resp.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        assert models["data"][0]["id"] == demo_gguf_path.stem
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer k3y"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert f"serving {demo_gguf_path.name} at http://127.0.0.1:{port}/v1 (API key required)" in output
    assert "server stopped" in output and proc.returncode == 0


def test_chat_command_reads_stdin_until_exit(demo_gguf_path):
    proc = subprocess.run([EDGETUNE, "chat", str(demo_gguf_path), "--max-tokens", "4", "--temperature", "0",
                           "--n-ctx", "512", "--threads", "2"],
                          input="/system Be terse.\nHello\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(system prompt set)" in proc.stdout
    assert proc.stdout.count(">>> ") == 3  # prompted for each line, stopped at /exit
