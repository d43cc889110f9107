"""The GGUF tensor-info reader agrees with gguf-py's GGUFReader, metadata arrays and all."""

from __future__ import annotations

import numpy as np
import pytest

from edgetune.errors import EdgetuneError
from edgetune.export.gguf_info import read_metadata, read_tensor_infos


def test_tensor_infos_match_gguf_reader(tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import quantize

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    # every kind of value the reader has to skip: scalars, strings, arrays of strings and numbers
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("general.name", "tiny ünïcode")
    w.add_token_list(["<s>", "</s>", "héllo", "", "a" * 300])
    w.add_token_scores([0.0, -1.5, 2.0, 0.25, 3.0])
    w.add_array("tokenizer.ggml.merges", ["h é", "l lo"])
    w.add_uint64("general.quantization_version", 2)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((5, 64)).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    q = quantize(rng.standard_normal((3, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)  # q: the byte shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    infos = read_tensor_infos(path)
    ref = GGUFReader(str(path)).tensors
    assert [(t.name, t.shape, t.type_name, t.n_elements) for t in infos] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name.lower(), int(t.n_elements)) for t in ref
    ]
    assert [t.type_name for t in infos] == ["f16", "f32", "q8_0"]
    assert infos[2].shape == (64, 3)  # GGUF order: fastest-varying dimension first

    meta = read_metadata(path, ["general.name", "llama.block_count", "llama.rope.freq_base", "tokenizer.ggml.tokens",
                                "tokenizer.ggml.scores", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.merges", "absent.key"])
    assert meta == {
        "general.name": "tiny ünïcode", "llama.block_count": 2, "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.tokens": ["<s>", "</s>", "héllo", "", "a" * 300], "tokenizer.ggml.scores": [0.0, -1.5, 2.0, 0.25, 3.0],
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.merges": ["h é", "l lo"],
    }
    # and the same values as gguf-py's reader
    r = GGUFReader(str(path))
    assert meta["tokenizer.ggml.tokens"] == [bytes(r.fields["tokenizer.ggml.tokens"].parts[i]).decode()
                                             for i in r.fields["tokenizer.ggml.tokens"].data]
    assert meta["llama.block_count"] == int(r.fields["llama.block_count"].parts[-1][0])


def test_not_a_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(40))
    with pytest.raises(EdgetuneError, match="not a little-endian GGUF"):
        read_tensor_infos(bad)
