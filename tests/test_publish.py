"""`edgetune publish RUN`: the shared folder, its model card, the refusals, Ollama and the Hub, atomicity.

One real tiny run (`edgetune run`: data, a torch LoRA step, fuse, f16 + q8_0 GGUFs llama.cpp loads,
the Modelfile with its template check, eval of base / tuned / q8_0) is made once; each test publishes
a copy of it. The base model sits in a Hub-cache-shaped folder (models--TestOrg--tiny-llama) with an
Apache LICENSE and a README whose metadata names the license.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgetune import pipeline, registry
from edgetune.cli import cli
from edgetune.errors import EdgetuneError
from edgetune.eval.gates import check_gates
from edgetune.io import read_json, sha256_file, write_json
from edgetune.ollama.modelfile_syntax import read_modelfile
from edgetune.publish import base_model_id, find_license, publish
from edgetune.runfolder import RunFolder

APACHE = "\n                                 Apache License\n                           Version 2.0, January 2004\n"


@pytest.fixture(scope="module")
def done_run(tiny_llama_dir, tiny_recipe, tmp_path_factory) -> RunFolder:
    tmp = tmp_path_factory.mktemp("publish")
    base = tmp / "hub" / "models--TestOrg--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llama_dir, base)
    (base / "LICENSE").write_text(APACHE, encoding="utf-8")
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags: [test]\n---\n# tiny llama\n", encoding="utf-8")
    recipe = tiny_recipe(tmp, base, n=40, iters=1, batch_size=1, rank=2, alpha=4, save_every=1)
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["export"] = {"quants": ["q8_0"], "verify": False}
    raw["eval"] = {"limit": 2, "max_tokens": 2, "regression": False, "gates": {"json_valid": 0.0}}
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test home is set: use our own
        mp.setenv("EDGETUNE_HOME", str(tmp / "home"))
        pipeline.run(pipeline.load_recipe(recipe), log=lambda s: None)
    return RunFolder(tmp / "runs" / "tiny")


@pytest.fixture
def run(done_run, tmp_path) -> RunFolder:
    """A private copy of the finished run (tests change and publish it)."""
    return RunFolder(shutil.copytree(done_run.root, tmp_path / "runs" / "tiny", ignore=shutil.ignore_patterns("train")))


def _cli(*args, ok: bool = True, env: dict | None = None) -> str:
    """The command's output; a refusal's message, where and fix included (CliRunner leaves them in the exception)."""
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    else:
        assert r.exit_code != 0, r.output
        assert r.exception is None or isinstance(r.exception, (EdgetuneError, SystemExit)), repr(r.exception)
    return r.output + ("" if r.exception is None else str(r.exception))


def _front_matter(card: str) -> tuple[dict, str]:
    m = re.match(r"---\n(.*?)\n---\n(.*)", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def _sums(folder: Path) -> dict[str, str]:
    return {name: h for h, name in (line.split("  ", 1) for line in (folder / "SHA256SUMS").read_text().splitlines())}


def _md_table(body: str, first_header: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose first header cell is ``first_header``."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def _fail_gates(run: RunFolder) -> None:
    """What the eval stage records when a gate fails: the report's verdict and the manifest's summary."""
    report = read_json(run.eval_report("json"))
    report["gates"] = check_gates(report["models"], report["baseline"], {"json_valid": 0.5}, {})
    assert not report["gates"]["passed"]
    write_json(run.eval_report("json"), report)
    manifest = run.manifest()
    manifest["stages"]["eval"]["summary"]["gates_passed"] = False
    manifest["stages"]["eval"]["status"] = "failed"
    write_json(run.manifest_path, manifest)


def test_publish_folder_card_sums_and_modelfile(run):
    out = _cli("publish", run.root)
    folder = run.root / "publish"
    assert str(folder) in out
    ggufs = {p.name for p in run.ggufs}
    assert ggufs == {"tiny-triage-f16.gguf", "tiny-triage-q8_0.gguf"}
    assert {p.name for p in folder.iterdir()} == ggufs | {"Modelfile", "LICENSE", "README.md", "SHA256SUMS"}
    for name in ggufs:  # the run's own files, hard-linked, not re-quantized
        assert (folder / name).stat().st_ino == (run.gguf_dir / name).stat().st_ino
    assert (folder / "LICENSE").read_text() == APACHE

    # every file but SHA256SUMS is listed, with its real hash
    sums = _sums(folder)
    assert set(sums) == {p.name for p in folder.iterdir()} - {"SHA256SUMS"}
    assert all(sha256_file(folder / n) == h for n, h in sums.items())

    # the Modelfile parses and runs on a file in the folder
    mf = read_modelfile(folder / "Modelfile")
    assert mf.get("model") == "./tiny-triage-q8_0.gguf" and (folder / mf.get("model")).is_file()
    assert mf.get("template") == read_modelfile(run.modelfile).get("template")

    meta, body = _front_matter((folder / "README.md").read_text(encoding="utf-8"))
    assert meta["base_model"] == "TestOrg/tiny-llama" and meta["license"] == "apache-2.0"
    assert {"gguf", "edgetune", "ollama", "lora"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"]

    # the eval table: every metric of every model, the report's numbers
    report = read_json(run.eval_report("json"))
    table = _md_table(body, "metric")
    names = [m["name"] for m in report["models"]]
    assert table[0] == ["metric", *names] and names == ["base", "tuned", "q8_0"]
    cells = {row[0]: dict(zip(names, row[1:], strict=True)) for row in table[2:]}
    for m in report["models"]:
        assert set(m["metrics"]) <= set(cells)
        for k, v in m["metrics"].items():
            assert float(cells[k][m["name"]]) == pytest.approx(v, abs=5e-5), (m["name"], k)

    # data card, quant table, template check, gates, how to run
    card = read_json(run.data_card)
    splits = {row[0]: row[1] for row in _md_table(body, "split")[2:]}
    assert splits == {s: str(card["splits"][s]) for s in ("train", "valid", "test")}
    assert f"rejected rows: {card['counts']['rejected']}" in body and sha256_file(run.data_card) in body
    files = {row[0].strip("`"): row for row in _md_table(body, "file")[2:]}
    assert set(files) == ggufs
    for name, row in files.items():
        assert row[1] == name.removeprefix("tiny-triage-").removesuffix(".gguf")
        assert row[2] == str((folder / name).stat().st_size) and row[4] == f"`{sums[name]}`"
    assert "pass (13 conversations token-identical)" in body
    assert "Passed (" in body and "json_valid" in body.split("### Eval gates")[1]
    assert "ollama create tiny-triage -f Modelfile" in body and "llama-cli -m ./tiny-triage-q8_0.gguf" in body
    assert "evaluated on 2 held-out rows" in body.lower()
    assert "Warning" not in body and "/tmp" not in body  # no local paths in a card that is shared

    # published again: the folder is replaced as a whole, the same files come back
    _cli("publish", run.root)
    assert _sums(folder) == sums and {p.name for p in folder.iterdir()} == set(sums) | {"SHA256SUMS"}
    assert not [p for p in run.root.iterdir() if p.name.startswith(".publish")]


def test_refusals_without_eval_report_failed_gates_or_gguf(run, tmp_path):
    report = run.eval_report("json").read_bytes()
    run.eval_report("json").unlink()
    out = _cli("publish", run.root, ok=False)
    assert "no eval report" in out and str(run.root) in out and "edgetune eval" in out
    assert not (run.root / "publish").exists()
    _cli("publish", run.root, "--force")
    _, body = _front_matter((run.root / "publish" / "README.md").read_text())
    first_note = next(line for line in body.splitlines() if line.startswith(">"))
    assert first_note.startswith("> **Warning: this model was NOT evaluated.**")
    assert "| metric |" not in body and "Not evaluated: no gate was checked." in body

    run.eval_report("json").write_bytes(report)
    _fail_gates(run)
    out = _cli("publish", run.root, "--out", tmp_path / "out", ok=False)
    assert "failed its eval gates" in out and "json_valid" in out and "--force" in out
    assert not (tmp_path / "out").exists()
    out = _cli("publish", run.root, "--out", tmp_path / "out", "--force")
    assert "failed its eval gates" in out  # the warning
    _, body = _front_matter((tmp_path / "out" / "README.md").read_text())
    assert "> **Warning: this model FAILED its eval gates**" in body
    assert "> - q8_0: json_valid = 0, required >= 0.5" in body and "**FAILED:**" in body

    shutil.rmtree(run.gguf_dir)
    out = _cli("publish", run.root, "--force", ok=False)
    assert "no exported GGUF" in out and "--to export" in out


def test_unknown_license_warns_and_card_says_so(run, tmp_path):
    bare = tmp_path / "bare-base"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    manifest = run.manifest()
    manifest["model_dir"] = str(bare)
    write_json(run.manifest_path, manifest)
    out = _cli("publish", run.root)
    assert "warning:" in out and "license: unknown" in out
    folder = run.root / "publish"
    assert not (folder / "LICENSE").exists()
    meta, body = _front_matter((folder / "README.md").read_text())
    assert meta["license"] == "unknown" and meta["base_model"] == "bare-base"
    assert "**license: unknown.**" in body


def test_license_and_base_model_lookup(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert find_license(d).id is None
    (d / "SOURCE.md").write_text("# demo\n\n- upstream model: HuggingFaceTB/SmolLM2-135M-Instruct\n- license: Apache-2.0\n")
    assert find_license(d).id == "apache-2.0" and base_model_id(d) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (d / "config.json").write_text('{"license": "MIT", "_name_or_path": "Org/Other"}')
    assert find_license(d).id == "mit"
    (d / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\n---\ntext\n")
    lic = find_license(d)
    assert (lic.id, lic.name, lic.file) == ("other", "tiny-license", None)
    (d / "LICENSE.md").write_text("MIT License\n\nCopyright (c) 2025\n")
    lic = find_license(d)
    assert lic.file == d / "LICENSE.md" and lic.id == "other"  # the README's metadata names it
    (d / "README.md").unlink()
    assert find_license(d).id == "mit"  # from the text
    (d / "SOURCE.md").unlink()
    assert base_model_id(d) == "Org/Other"


def test_ollama_without_binary_prints_the_commands(run, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    for bad in ("tiny-triage", "alice/tiny triage", "alice/-x:q8"):
        out = _cli("publish", run.root, "--ollama", bad, ok=False, env={"PATH": str(empty)})
        assert "ollama" in out.lower()
    assert not (run.root / "publish").exists()  # names are checked before anything is written
    out = _cli("publish", run.root, "--ollama", "alice/tiny-triage:q8_0", env={"PATH": str(empty)})
    modelfile = (run.root / "publish" / "Modelfile").resolve()
    assert "ollama is not on PATH" in out
    assert f"ollama create alice/tiny-triage:q8_0 -f {modelfile}" in out
    assert "ollama push alice/tiny-triage:q8_0" in out
    _, body = _front_matter((run.root / "publish" / "README.md").read_text())
    assert "ollama run alice/tiny-triage:q8_0" in body
    kinds = [p["kind"] for p in read_json(run.manifest_path)["published"]]
    assert kinds == ["folder"]  # nothing was pushed


def _fake_ollama(bin_dir: Path, log: Path, fail_on: str = "") -> None:
    bin_dir.mkdir()
    script = bin_dir / "ollama"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\necho "fake ollama: $1 done"\n'
                      + (f'[ "$1" = "{fail_on}" ] && {{ echo "error: not allowed" >&2; exit 3; }}\n' if fail_on else "")
                      + "exit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_fake_ollama_gets_create_then_push(run, tmp_path):
    log = tmp_path / "argv.log"
    _fake_ollama(tmp_path / "bin", log)
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    out = _cli("publish", run.root, "--ollama", "alice/tiny-triage:q8_0", env={"PATH": path})
    modelfile = (run.root / "publish" / "Modelfile").resolve()
    assert log.read_text().splitlines() == [f"create alice/tiny-triage:q8_0 -f {modelfile}", "push alice/tiny-triage:q8_0"]
    assert "fake ollama: create done" in out and "fake ollama: push done" in out  # its output is shown
    published = read_json(run.manifest_path)["published"]
    assert [(p["kind"], p["target"]) for p in published] == [("folder", str((run.root / "publish").resolve())),
                                                             ("ollama", "alice/tiny-triage:q8_0")]
    assert published[1]["files"] == _sums(run.root / "publish")

    # a failing push is an error naming the command
    log.unlink()
    _fake_ollama(tmp_path / "bin2", log, fail_on="push")
    with pytest.raises(EdgetuneError, match=r"`ollama push alice/tiny-triage:q8_0` failed \(exit 3\)") as exc:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PATH", f"{tmp_path / 'bin2'}{os.pathsep}{os.environ.get('PATH', '')}")
            publish(run.root, ollama="alice/tiny-triage:q8_0")
    assert "error: not allowed" in exc.value.message


def test_hf_layout_and_upload_without_token(run, tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the test touched the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))

    out = _cli("publish", run.root, "--upload", "alice/tiny", ok=False)
    assert "--upload needs --hf" in out
    hub = tmp_path / "hub-repo"
    out = _cli("publish", run.root, "--hf", hub, "--upload", "alice/tiny-triage-gguf", ok=False)
    assert "No Hugging Face token" in out and "nothing was uploaded" in out
    assert f"hf upload alice/tiny-triage-gguf {hub} ." in out and "huggingface-cli upload" in out
    assert (hub / ".gitattributes").read_text() == "*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    folder = run.root / "publish"
    assert {p.name for p in hub.iterdir()} == {p.name for p in folder.iterdir()} | {".gitattributes"}
    sums = _sums(hub)
    assert ".gitattributes" in sums and all(sha256_file(hub / n) == h for n, h in sums.items())
    assert (hub / "README.md").read_bytes() == (folder / "README.md").read_bytes()
    published = read_json(run.manifest_path)["published"]
    assert [p["kind"] for p in published] == ["folder", "hf"] and published[1]["target"] == str(hub.resolve())


def test_atomic_build_keeps_the_previous_folder(run, tmp_path, monkeypatch):
    import edgetune.publish as pub

    def crash(path, sums):
        (path.parent / "README.md").write_text("half")  # something written, then the build fails
        raise RuntimeError("disk gone mid-build")

    real = pub._write_sums
    monkeypatch.setattr(pub, "_write_sums", crash)
    with pytest.raises(RuntimeError):
        publish(run.root)
    assert not (run.root / "publish").exists()
    assert not [p for p in run.root.iterdir() if p.name.startswith(".publish")]

    monkeypatch.setattr(pub, "_write_sums", real)
    publish(run.root)
    before = {p.name: p.read_bytes() for p in (run.root / "publish").iterdir() if p.suffix != ".gguf"}
    monkeypatch.setattr(pub, "_write_sums", crash)
    with pytest.raises(RuntimeError):
        publish(run.root, force=True)
    assert {p.name: p.read_bytes() for p in (run.root / "publish").iterdir() if p.suffix != ".gguf"} == before
    assert not [p for p in run.root.iterdir() if p.name.startswith(".publish")]

    # a folder publish did not write is never replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    monkeypatch.setattr(pub, "_write_sums", real)
    out = _cli("publish", run.root, "--out", other, ok=False)
    assert "was not written by edgetune publish" in out and (other / "notes.txt").read_text() == "keep me"


def test_registry_records_the_publication(run):
    entry, created = registry.register_run(run)
    assert created
    _cli("publish", run.root)
    (item,) = registry.publications(entry)
    assert item["kind"] == "folder" and item["target"] == str((run.root / "publish").resolve())
    assert item["files"] == _sums(run.root / "publish") and item["time"]
    assert "published" not in read_json(run.manifest_path)  # the registered run's record is in its entry
    assert registry.get(entry.ref).manifest.get("fingerprint") == entry.manifest["fingerprint"]  # manifest untouched
    out = _cli("models", "show", entry.ref)
    assert "published" in out and str((run.root / "publish").resolve()) in out


def test_adapter_route_ships_the_adapter_and_its_source(run, tmp_path, make_lora_gguf):
    """export.route: adapter — the adapter GGUF, ADAPTER rewritten beside it; FROM a source file: that file
    is shipped too (unchanged) and FROM points at it; FROM an Ollama name: kept, the user pulls it."""
    raw = yaml.safe_load(run.run_yaml.read_text(encoding="utf-8"))
    raw["export"]["route"] = "adapter"
    run.run_yaml.write_text(yaml.safe_dump(raw), encoding="utf-8")
    run = RunFolder(run.root)
    adapter = make_lora_gguf(run.adapter_gguf, rank=2, layers=2, hidden=64)
    source = tmp_path / "source" / "tiny-Q8_0.gguf"
    source.parent.mkdir()
    shutil.copy(run.gguf("q8_0"), source)
    text = run.modelfile.read_text(encoding="utf-8")
    text = re.sub(r"^FROM .*$", f"FROM {source}\nADAPTER ../gguf/{adapter.name}", text, count=1, flags=re.M)
    run.modelfile.write_text(text, encoding="utf-8")

    publish(run.root)
    folder = run.root / "publish"
    mf = read_modelfile(folder / "Modelfile")
    assert (mf.get("model"), mf.get("adapter")) == ("./tiny-Q8_0.gguf", f"./{adapter.name}")
    assert {p.name for p in folder.glob("*.gguf")} == {"tiny-Q8_0.gguf", adapter.name}
    assert (folder / "tiny-Q8_0.gguf").read_bytes() == source.read_bytes()
    _, body = _front_matter((folder / "README.md").read_text())
    files = {row[0].strip("`"): row[1] for row in _md_table(body, "file")[2:]}
    assert files == {adapter.name: "LoRA adapter", "tiny-Q8_0.gguf": "q8_0"}
    assert f"llama-cli -m ./tiny-Q8_0.gguf --lora ./{adapter.name} -cnv" in body

    run.modelfile.write_text(text.replace(f"FROM {source}", "FROM qwen2.5:0.5b"), encoding="utf-8")
    publish(run.root)
    mf = read_modelfile(folder / "Modelfile")
    assert (mf.get("model"), mf.get("adapter")) == ("qwen2.5:0.5b", f"./{adapter.name}")
    assert {p.name for p in folder.glob("*.gguf")} == {adapter.name}
    assert "the GGUF of the Ollama model qwen2.5:0.5b" in (folder / "README.md").read_text()
