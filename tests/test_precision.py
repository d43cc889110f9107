"""The precision policy (edgetune.precision): flags, the probe, the env switch, decisions, doctor."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgetune import precision as P

pytestmark = pytest.mark.precision


def test_flags_settle_only_the_clear_cases():
    assert P._from_flags("x86_64", {"avx2", "fma", "f16c"}).fast_train is False  # AVX2-only: emulated bf16
    v = P._from_flags("x86_64", {"avx512f", "amx_bf16"})
    assert v.fast_train and v.fast_decode and "amx_bf16" in v.reason
    assert P._from_flags("x86_64", {"avx512f", "avx512_bf16"}).fast_train is True
    assert P._from_flags("x86_64", {"avx512f", "avx512bw"}) is None  # AVX-512 alone: measure
    assert P._from_flags("aarch64", {"asimd", "bf16", "sve"}) is None  # ARM words: measure
    assert P._from_flags("x86_64", set()) is None  # no /proc/cpuinfo (macOS): measure


def _timings(train_fp32, train_bf16, dec_fp32, dec_bf16, per_row=0.2):
    """Synthetic probe timings: decode rows cost 1 + per_row*(rows-1) one-row steps."""
    m = P.TRAIN_SHAPE[0]
    t = {f"fp32/{m}": train_fp32, f"bf16/{m}": train_bf16}
    for b in P.GEN_BATCHES:
        t[f"fp32/{b}"] = dec_fp32 * (1 + per_row * (b - 1))
        t[f"bf16/{b}"] = dec_bf16 * (1 + per_row * (b - 1))
    return t


def test_probe_verdicts_follow_the_measurements():
    emulated = P._verdict_from_timings(_timings(0.004, 0.5, 0.0003, 0.0002))  # like the AVX2 EPYC
    assert not emulated.fast_train and emulated.fast_decode and emulated.source == "probe"
    amx = P._verdict_from_timings(_timings(0.004, 0.0007, 0.0003, 0.00015))
    assert amx.fast_train and amx.fast_decode
    tie = P._verdict_from_timings(_timings(0.004, 0.0038, 0.0003, 0.00029))
    assert not tie.fast_train and not tie.fast_decode  # bf16 must win clearly to give up fp32


def test_generation_batch_and_dtype_from_the_cost_model():
    t = _timings(0.004, 0.5, 0.0003, 0.0002, per_row=0.1)
    # prefill in emulated bf16 costs far more than decode saves: fp32, and batching pays
    assert P._request_cost(t, "fp32") < P._request_cost(t, "bf16")
    assert P.gen_batch(t, "fp32") == max(P.GEN_BATCHES)
    # rows that cost far more together than apart (a cache-bound kernel): no point batching
    assert P.gen_batch(_timings(0.004, 0.5, 0.0003, 0.0002, per_row=15), "fp32") == 1


def test_env_switch_forces_both_paths(monkeypatch):
    monkeypatch.setenv(P.ENV_CPU_BF16, "slow")
    P.cpu_bf16.cache_clear()
    d = P.decide("train", "cpu")
    assert d.dtype == "fp32" and "EDGETUNE_CPU_BF16=slow" in d.reason
    g = P.decide("generate", "cpu")
    assert g.dtype == "fp32" and g.batch_size in P.GEN_BATCHES
    monkeypatch.setenv(P.ENV_CPU_BF16, "fast")
    P.cpu_bf16.cache_clear()
    assert P.decide("train", "cpu").dtype == "bf16"
    assert P.decide("score", "cpu").dtype == "bf16"
    assert P.decide("generate", "cpu").dtype == "bf16"


def test_explicit_dtype_wins(monkeypatch):
    monkeypatch.setenv(P.ENV_CPU_BF16, "slow")
    P.cpu_bf16.cache_clear()
    assert P.decide("train", "cpu", "bf16").dtype == "bf16"
    assert P.decide("generate", "cpu", "bfloat16").reason == "asked for explicitly"
    with pytest.raises(ValueError):
        P.decide("train", "cpu", "int3")


def test_real_probe_measures_every_shape_quickly():
    import time

    t0 = time.perf_counter()
    t = P.measure_cpu(threads=1)
    assert time.perf_counter() - t0 < 5.0
    m = P.TRAIN_SHAPE[0]
    assert {f"{d}/{r}" for d in ("fp32", "bf16") for r in (m, *P.GEN_BATCHES)} == set(t)
    assert all(v > 0 for v in t.values())
    v = P._verdict_from_timings(t)
    assert f"{m}-row matmul" in v.reason


def test_probe_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(P.ENV_CPU_BF16, raising=False)
    P.cpu_timings.cache_clear()
    t = P.cpu_timings()
    files = list((tmp_path / ".cache" / "edgetune").glob("precision-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == t
    P.cpu_timings.cache_clear()
    files[0].write_text(json.dumps({k: 1.0 for k in t}))
    assert set(P.cpu_timings().values()) == {1.0}  # read back, not re-measured
    P.cpu_timings.cache_clear()
    files[0].write_text(json.dumps({"fp32/1": 1.0}))  # a cache from other probe shapes: measured again
    assert set(P.cpu_timings()) == set(t)
    P.cpu_timings.cache_clear()


def test_doctor_json_reports_the_decision_per_device(monkeypatch):
    from edgetune.cli import cli

    monkeypatch.setenv(P.ENV_CPU_BF16, "slow")
    P.cpu_bf16.cache_clear()
    res = CliRunner().invoke(cli, ["doctor", "--json", "--no-llama-check"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    prec = info["precision"]
    assert prec["cpu_bf16"]["fast_train"] is False and prec["cpu_bf16"]["source"] == "env"
    cpu = prec["devices"]["cpu"]
    assert cpu["train"]["dtype"] == "fp32" and cpu["train"]["reason"]
    assert cpu["generate"]["batch_size"] in P.GEN_BATCHES
    assert "fp32" in info["auto_backend"]["reason"]
