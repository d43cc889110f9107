"""Model registry: versions increase, nothing is overwritten, the same run is registered once."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from edgetune import registry
from edgetune.cli import cli
from edgetune.errors import EdgetuneError
from edgetune.paths import home


def _artifacts(tmp_path, tag: str):
    src = tmp_path / f"src-{tag}"
    (src / "adapter").mkdir(parents=True, exist_ok=True)
    (src / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (src / "m-q4_k_m.gguf").write_bytes(b"GGUF" + tag.encode() * 100)
    (src / "Modelfile").write_text("FROM ./m-q4_k_m.gguf\n")
    return {"m-q4_k_m.gguf": src / "m-q4_k_m.gguf", "Modelfile": src / "Modelfile", "adapter": src / "adapter"}


def test_versions_increase_and_nothing_is_overwritten(tmp_path):
    e1, created1 = registry.register("demo", {"method": "lora", "metrics": {"tuned": {"exact_match": 0.5}}}, _artifacts(tmp_path, "a"), "fp-a")
    assert created1 and e1.version == 1 and e1.path == home() / "demo" / "v1"
    before = (e1.path / "manifest.yaml").read_bytes()
    e2, created2 = registry.register("demo", {"method": "dora"}, _artifacts(tmp_path, "b"), "fp-b")
    assert created2 and e2.version == 2
    assert (e1.path / "manifest.yaml").read_bytes() == before  # v1 untouched
    assert (e1.path / "m-q4_k_m.gguf").read_bytes() == b"GGUF" + b"a" * 100
    assert (e2.path / "m-q4_k_m.gguf").read_bytes() == b"GGUF" + b"b" * 100
    assert (e2.path / "adapter" / "adapter_config.json").is_file()
    m = yaml.safe_load((e2.path / "manifest.yaml").read_text())
    assert m["name"] == "demo" and m["version"] == 2 and m["method"] == "dora" and m["created"]
    assert [e.ref for e in registry.list_entries()] == ["demo:v1", "demo:v2"]
    assert not [p for p in (home() / "demo").iterdir() if p.name.startswith((".new", ".rm"))], "temp folders left behind"


def test_same_fingerprint_is_registered_once(tmp_path):
    e1, created = registry.register("demo", {}, _artifacts(tmp_path, "a"), "same")
    e2, created2 = registry.register("demo", {}, _artifacts(tmp_path, "a"), "same")
    assert created and not created2 and e2.version == e1.version == 1
    assert len(registry.list_entries("demo")) == 1


def test_version_after_removal_never_reuses_a_number(tmp_path):
    registry.register("demo", {}, _artifacts(tmp_path, "a"), "a")
    registry.register("demo", {}, _artifacts(tmp_path, "b"), "b")
    registry.remove("demo:v1")
    e3, _ = registry.register("demo", {}, _artifacts(tmp_path, "c"), "c")
    assert e3.version == 3
    # a half-made version folder (another process mid-registration) is not taken over either
    (home() / "demo" / "v4").mkdir()
    e5, _ = registry.register("demo", {}, _artifacts(tmp_path, "d"), "d")
    assert e5.version == 5
    # removing every version one by one still does not reset the numbering
    for ref in ("demo:v2", "demo:v3", "demo:v5"):
        registry.remove(ref)
    (home() / "demo" / "v4").rmdir()
    assert registry.list_entries() == []
    e6, _ = registry.register("demo", {}, _artifacts(tmp_path, "e"), "e")
    assert e6.version == 6


def test_get_and_parse_ref(tmp_path):
    registry.register("demo", {}, _artifacts(tmp_path, "a"), "a")
    registry.register("demo", {}, _artifacts(tmp_path, "b"), "b")
    assert registry.get("demo").version == 2
    assert registry.get("demo:1").version == 1 and registry.get("demo:v1").version == 1
    assert registry.parse_ref("x:latest") == ("x", None)
    with pytest.raises(EdgetuneError, match="no version v9"):
        registry.get("demo:v9")
    with pytest.raises(EdgetuneError, match="No registered model named 'nope'"):
        registry.get("nope")
    for bad in ("", "../etc", "base", "a b", "demo:vx"):
        with pytest.raises(EdgetuneError):
            registry.parse_ref(bad)


def test_remove_all_versions(tmp_path):
    registry.register("demo", {}, _artifacts(tmp_path, "a"), "a")
    registry.register("demo", {}, _artifacts(tmp_path, "b"), "b")
    removed = registry.remove("demo")
    assert [e.ref for e in removed] == ["demo:v1", "demo:v2"]
    assert registry.list_entries() == [] and not (home() / "demo").exists()


def test_base_models_folder_is_not_listed(tmp_path):
    (home() / "base" / "smollm2").mkdir(parents=True)
    (home() / "base" / "smollm2" / "config.json").write_text("{}")
    assert registry.list_entries() == []


def test_models_cli_list_show_rm(tmp_path):
    registry.register("triage", {"method": "lora", "base_model": {"path": "/x/smollm2"},
                                 "metrics": {"tuned": {"exact_match": 0.9}}, "artifacts": {"a": {"size": 2**20}}},
                      _artifacts(tmp_path, "a"), "a")
    runner = CliRunner()
    r = runner.invoke(cli, ["models", "list"])
    assert r.exit_code == 0, r.output
    assert "triage:v1" in r.output and "exact_match 0.900" in r.output
    r = runner.invoke(cli, ["models", "show", "triage:1"])
    assert r.exit_code == 0 and "fingerprint: a" in r.output
    r = runner.invoke(cli, ["models", "rm", "triage"], input="n\n")
    assert r.exit_code != 0 and registry.list_entries("triage")
    r = runner.invoke(cli, ["models", "rm", "triage:v1", "--yes"])
    assert r.exit_code == 0 and "removed triage:v1" in r.output
    assert registry.list_entries() == []
