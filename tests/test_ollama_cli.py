"""`edgetune ollama` / `edgetune ollama check` on the real demo GGUF + tokenizer, and `--create`."""

from __future__ import annotations

import json
import os
import stat
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from edgetune.cli import main
from edgetune.ollama.modelfile_syntax import read_modelfile
from edgetune.ollama_client import ollama_create


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main([*map(str, args)])
        raise SystemExit(0)
    cap = capsys.readouterr()
    return ei.value.code or 0, cap.out, cap.err


@pytest.mark.slow
def test_write_check_and_create_without_ollama(tmp_path, capsys, monkeypatch, demo_gguf_path, tokenizer_dir):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no ollama here
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "ollama", demo_gguf_path, "--name", "smol-test", "-o", out, "--model-dir",
                           tokenizer_dir, "--system", 'Reply in JSON. Use """ and {{ }} freely.', "--create")
    assert code == 0, err
    assert "identical" in err and "DIFFERENT" not in err
    mf_path = out / "Modelfile"
    assert f"ollama is not on PATH; to create the model, run:\n  ollama create smol-test -f {mf_path.resolve()}" in err
    mf = read_modelfile(mf_path)
    assert mf.get("system") == 'Reply in JSON. Use """ and {{ }} freely.'
    code, stdout, err = run_cli(capsys, "ollama", "check", mf_path, "--model-dir", tokenizer_dir, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["ok"] and data["identical"] >= 5 and data["family"] == "chatml"
    assert {c["compared"] for c in data["conversations"]} == {"tokens"}


@pytest.mark.slow
def test_check_exits_1_with_a_diff(tmp_path, capsys, demo_gguf_path, tokenizer_dir):
    code, _, err = run_cli(capsys, "ollama", "write", demo_gguf_path, "-o", tmp_path, "--model-dir", tokenizer_dir)
    assert code == 0, err
    mf_path = tmp_path / "Modelfile"
    mf_path.write_text(mf_path.read_text().replace("<|im_start|>{{ .Role }}\n", "<|im_start|>{{ .Role }}: "))
    code, _, err = run_cli(capsys, "ollama", "check", mf_path, "--model-dir", tokenizer_dir)
    assert code == 1
    assert "DIFFERENT" in err and "part at position" in err


def test_bad_inputs_are_errors_without_traceback(tmp_path, capsys, smollm2_meta_gguf):
    tfile = tmp_path / "bad.tmpl"
    tfile.write_text("{{ if .System }}never closed")
    code, _, err = run_cli(capsys, "ollama", smollm2_meta_gguf, "-o", tmp_path, "--template", tfile)
    assert code == 1 and "not a valid Go template" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "ollama", smollm2_meta_gguf, "-o", tmp_path, "--name", "bad name!")
    assert code == 1 and "not a valid Ollama model name" in err
    code, _, err = run_cli(capsys, "ollama", smollm2_meta_gguf, "-o", tmp_path, "--top-p", "3")
    assert code == 1 and "ollama.top_p" in err
    assert not (tmp_path / "Modelfile").exists()


class _FakeOllamaAPI(BaseHTTPRequestHandler):
    """Answers /api/chat with the fields Ollama's API returns (message, eval_count, eval_duration)."""

    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeOllamaAPI.requests.append((self.path, body))
        payload = json.dumps({"message": {"role": "assistant", "content": "Hello!"}, "done": True,
                              "eval_count": 20, "eval_duration": 500_000_000}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *a):
        pass


def test_create_runs_ollama_create_then_smoke_chat(tmp_path, monkeypatch, smollm2_meta_gguf):
    """No Ollama binary exists on CI: a stand-in executable records its argv and a stand-in HTTP
    endpoint answers /api/chat, so the --create path (command line, request, tokens/s) is exercised."""
    from edgetune.ollama.modelfile import write_modelfile

    mf_path = write_modelfile(smollm2_meta_gguf, tmp_path, "smol")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    argv_file = tmp_path / "argv.txt"
    exe = bindir / "ollama"
    exe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{argv_file}"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    httpd = HTTPServer(("127.0.0.1", 0), _FakeOllamaAPI)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        res = ollama_create(mf_path, "smol", host=f"127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
    assert res.ran and res.answer == "Hello!" and res.tokens_per_s == pytest.approx(40.0)
    assert argv_file.read_text().split("\n")[:4] == ["create", "smol", "-f", str(Path(mf_path).resolve())]
    path, body = _FakeOllamaAPI.requests[-1]
    assert path == "/api/chat" and body["model"] == "smol" and body["stream"] is False
