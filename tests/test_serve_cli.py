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

import pytest

from edgetune.serve import free_port, load_llm

EDGETUNE = shutil.which("edgetune", path=str(Path(sys.executable).parent)) or "edgetune"


@pytest.mark.slow
def test_serve_command_with_adapter_answers_and_stops(tmp_path, demo_gguf_path, make_lora_gguf, greedy_chat):
    adapter = make_lora_gguf(tmp_path / "lora.gguf")
    port = free_port()
    env = {**os.environ, "EDGETUNE_API_KEY": "k3y"}
    proc = subprocess.Popen([EDGETUNE, "serve", str(demo_gguf_path), "--adapter", str(adapter), "--port", str(port),
                             "--n-ctx", "512", "--threads", "2"],
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
        q = "What is the capital of France?"
        body = json.dumps({"messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer k3y"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            served = json.loads(resp.read())["choices"][0]["message"]["content"]
        # the server applied the adapter: its greedy answer is the adapted model's, not the base's
        # (first 6 tokens: later ones may flip between batch sizes on this deliberately noisy adapter)
        assert served == greedy_chat(load_llm(demo_gguf_path, adapter=adapter, n_ctx=512, n_threads=2), q, 6)
        assert served != greedy_chat(load_llm(demo_gguf_path, n_ctx=512, n_threads=2), q, 6)
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert f"serving {demo_gguf_path.name} at http://127.0.0.1:{port}/v1 (API key required)" in output
    assert "server stopped" in output and proc.returncode == 0


@pytest.mark.slow
def test_chat_command_reads_stdin_until_exit(demo_gguf_path):
    proc = subprocess.run([EDGETUNE, "chat", str(demo_gguf_path), "--max-tokens", "4", "--temperature", "0",
                           "--n-ctx", "512", "--threads", "2"],
                          input="/system Be terse.\nHello\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(system prompt set)" in proc.stdout
    assert proc.stdout.count(">>> ") == 3  # prompted for each line, stopped at /exit
