"""Every eval runner against a real runtime here: transformers (+PEFT), llama.cpp (+GGUF LoRA),
mlx-lm on CPU, an OpenAI-compatible server (edgetune serve). Ollama has no binary on this
machine, so its runner is tested against a fake server replaying Ollama's recorded protocol."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from edgetune.errors import EdgetuneError
from edgetune.eval.runners import GenParams, make_runner

MSGS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_adapter_dir(tiny_llama_dir, tmp_path_factory):
    """A PEFT LoRA adapter with random (non-zero) B, so it really changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("tiny-adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_llama_dir, tiny_adapter_dir, tmp_path_factory):
    """The tiny model as an f32 GGUF and its adapter as a GGUF LoRA (edgetune's own exporters)."""
    from edgetune.export.adapter import export_adapter
    from edgetune.export.gguf import convert

    d = tmp_path_factory.mktemp("tiny-gguf")
    model = convert(tiny_llama_dir, d / "tiny-f32.gguf", "f32", verify=False, show_progress=False)
    lora = export_adapter(tiny_llama_dir, tiny_adapter_dir, d / "tiny-lora.gguf", outtype="f32")
    return model, lora


@pytest.mark.slow
def test_gguf_runner_generates_greedy_with_counts_and_timing(demo_gguf_path):
    r = make_runner(f"gguf:{demo_gguf_path}", n_ctx=512)
    try:
        g1 = r.generate(MSGS, GenParams(max_tokens=12))
        g2 = r.generate(MSGS, GenParams(max_tokens=12))
        assert g1.text == g2.text and "paris" in g1.text.lower()  # greedy: same answer twice, and a right one
        assert 0 < g1.completion_tokens <= 12
        assert g1.prompt_tokens == len(r.tokenize(r.render(MSGS)))
        assert 0 < g1.ttft_s <= g1.total_s
        one = r.generate(MSGS, GenParams(max_tokens=1))
        assert one.completion_tokens == 1 and one.finish_reason == "length"
        cut = r.generate(MSGS, GenParams(max_tokens=12, stop=["Paris"]))
        assert "Paris" not in cut.text and cut.finish_reason == "stop"
        good, n = r.score(MSGS, "Paris")
        bad, n2 = r.score(MSGS, "Zebra crossing potato")
        assert n >= 2 and n2 > n and math.isfinite(good)
        assert good / n < bad / n2  # the right answer is likelier per token than nonsense
    finally:
        r.close()


def test_gguf_runner_applies_gguf_lora_adapter(tiny_ggufs):
    model, lora = tiny_ggufs
    plain = make_runner(f"gguf:{model}", n_ctx=256)
    tuned = make_runner(f"gguf:{model}+adapter:{lora}", n_ctx=256)
    try:
        ids, _ = plain.encode(MSGS, "Paris")
        a, b = plain.logits(ids), tuned.logits(ids)
        assert a.shape == b.shape
        assert np.abs(a - b).max() > 0.1  # the adapter changes what llama.cpp computes
        assert tuned.info()["adapter"] == str(lora)
    finally:
        plain.close()
        tuned.close()
    with pytest.raises(EdgetuneError, match="adapter not found"):
        make_runner(f"gguf:{model}+adapter:/nonexistent/lora.gguf")


def test_hf_runner_with_and_without_peft_adapter(tiny_llama_dir, tiny_adapter_dir):
    base = make_runner(f"hf:{tiny_llama_dir}")
    tuned = make_runner(f"hf:{tiny_llama_dir}+adapter:{tiny_adapter_dir}")
    g = base.generate(MSGS, GenParams(max_tokens=6))
    assert 0 < g.completion_tokens <= 6 and g.ttft_s is not None and g.ttft_s <= g.total_s
    assert g.prompt_tokens == len(base.tokenize(base.render(MSGS)))
    assert base.generate(MSGS, GenParams(max_tokens=6)).text == g.text  # greedy is deterministic
    ids, n_prompt = base.encode(MSGS, "Paris")
    assert ids[:n_prompt] == base.tokenize(base.render(MSGS))
    la, lb = base.logits(ids), tuned.logits(ids)
    assert np.abs(la - lb).max() > 0.1
    s_base, n = base.score(MSGS, "Paris")
    s_tuned, n2 = tuned.score(MSGS, "Paris")
    assert n == n2 and s_base != pytest.approx(s_tuned)
    with pytest.raises(EdgetuneError, match="PEFT adapter"):
        make_runner(f"hf:{tiny_llama_dir}+adapter:{tiny_llama_dir}")


def test_hf_and_gguf_runners_see_the_same_prompt_tokens(tiny_llama_dir, tiny_ggufs):
    hf = make_runner(f"hf:{tiny_llama_dir}")
    gg = make_runner(f"gguf:{tiny_ggufs[0]}", n_ctx=256)
    try:
        assert hf.render(MSGS) == gg.render(MSGS)  # the GGUF carries the HF chat template
        assert hf.encode(MSGS, "Paris") == gg.encode(MSGS, "Paris")
    finally:
        gg.close()


@pytest.mark.mlx
def test_mlx_runner_on_cpu_matches_hf_logits(tiny_llama_dir):
    mlx_r = make_runner(f"mlx:{tiny_llama_dir}")
    hf = make_runner(f"hf:{tiny_llama_dir}")
    g = mlx_r.generate(MSGS, GenParams(max_tokens=5))
    assert 0 < g.completion_tokens <= 5 and g.ttft_s is not None
    assert g.prompt_tokens == len(hf.tokenize(hf.render(MSGS)))
    ids, n_prompt = mlx_r.encode(MSGS, "Paris")
    assert (ids, n_prompt) == hf.encode(MSGS, "Paris")
    a, b = mlx_r.logits(ids), hf.logits(ids)
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9  # same model, bf16 vs fp32 arithmetic
    nll_mlx, _ = mlx_r.score(MSGS, "Paris")
    nll_hf, _ = hf.score(MSGS, "Paris")
    assert nll_mlx == pytest.approx(nll_hf, rel=0.05)


@pytest.mark.slow
def test_openai_runner_against_edgetune_serve(demo_gguf_path):
    from edgetune.serve import make_server

    local = make_runner(f"gguf:{demo_gguf_path}", n_ctx=512)
    want = local.generate(MSGS, GenParams(max_tokens=8))
    local.close()
    with make_server(demo_gguf_path, port=None, n_ctx=512, n_threads=2, alias="smol") as srv:
        r = make_runner(f"openai:{srv.base_url}")
        assert r.model == "smol"  # the first model the server lists
        g = r.generate(MSGS, GenParams(max_tokens=8))
        assert g.text == want.text  # same GGUF, same template, greedy: same answer as llama.cpp direct
        assert 0 < g.completion_tokens <= 8 and g.ttft_s is not None
        named = make_runner(f"openai:smol@{srv.base_url}")
        assert named.generate(MSGS, GenParams(max_tokens=3)).completion_tokens <= 3
    with pytest.raises(EdgetuneError, match="Cannot reach"):
        make_runner("openai:smol@http://127.0.0.1:9/v1").generate(MSGS, GenParams(max_tokens=2))


# Lines recorded from Ollama's /api/chat streaming protocol (docs/api.md, "Chat request (streaming)").
OLLAMA_STREAM = [
    {"model": "triage", "created_at": "2024-11-23T02:00:00.1Z", "message": {"role": "assistant", "content": "{\"category\""}, "done": False},
    {"model": "triage", "created_at": "2024-11-23T02:00:00.2Z", "message": {"role": "assistant", "content": ":\"billing\"}"}, "done": False},
    {"model": "triage", "created_at": "2024-11-23T02:00:00.3Z", "message": {"role": "assistant", "content": ""}, "done": True,
     "done_reason": "stop", "total_duration": 300000000, "load_duration": 1000000, "prompt_eval_count": 42,
     "prompt_eval_duration": 50000000, "eval_count": 7, "eval_duration": 120000000},
]


class _FakeOllama(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        if body["model"] != "triage":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(json.dumps({"error": f"model '{body['model']}' not found"}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for line in OLLAMA_STREAM:
            self.wfile.write((json.dumps(line) + "\n").encode())
            self.wfile.flush()

    def log_message(self, *args):
        pass


def test_ollama_runner_against_recorded_protocol_fake_server(monkeypatch):
    """No ollama binary exists here: a fake server replays Ollama's recorded /api/chat stream."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOllama)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{srv.server_address[1]}")
        r = make_runner("ollama:triage")
        g = r.generate(MSGS, GenParams(max_tokens=20, stop=["\n\n"]))
        assert g.text == '{"category":"billing"}'
        assert (g.prompt_tokens, g.completion_tokens, g.finish_reason) == (42, 7, "stop")
        assert g.ttft_s is not None and g.total_s >= g.ttft_s
        path, body = _FakeOllama.requests[-1]
        assert path == "/api/chat" and body["messages"] == MSGS and body["stream"] is True
        assert body["options"]["temperature"] == 0.0 and body["options"]["num_predict"] == 20
        assert body["options"]["stop"] == ["\n\n"]
        with pytest.raises(EdgetuneError, match="404") as exc:
            make_runner("ollama:missing").generate(MSGS, GenParams(max_tokens=2))
        assert "ollama create missing" in exc.value.fix
    finally:
        srv.shutdown()
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    with pytest.raises(EdgetuneError, match="not reachable"):
        make_runner("ollama:triage").generate(MSGS, GenParams(max_tokens=2))


@pytest.mark.precision
def test_hf_batched_generation_matches_one_by_one(tiny_llama_dir):
    import torch

    r = make_runner(f"hf:{tiny_llama_dir}", dtype="float32")
    convs = [MSGS, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a long river in Africa, please."}]]
    params = GenParams(max_tokens=5)
    batched = r.generate_batch(convs, params)
    single = [r.generate(c, params) for c in convs]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]
    assert all(0 < g.completion_tokens <= 5 and g.batch == 2 for g in batched)
    # left padding changes nothing: the next-token distributions of the padded batch and of each
    # prompt alone agree (a batch of two is another GEMM shape, so compared as distributions)
    from edgetune.eval.divergence import drift

    prompts = [r.tokenize(r.render(c)) for c in convs]
    inp, mask, _ = r.left_pad(prompts)
    with torch.no_grad():
        padded = r.model(input_ids=inp, attention_mask=mask).logits[:, -1].float().numpy()
        alone = np.concatenate([r.model(input_ids=torch.tensor([p])).logits[:, -1].float().numpy() for p in prompts])
    row = drift(alone, padded, "padded vs alone")
    assert row.top1 == 1.0 and row.mean_kl < 1e-6, row
