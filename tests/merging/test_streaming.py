"""The streaming writer and merge loop: exact bytes, layout checks, dtypes, bounded reads."""

import pytest
import torch
from safetensors.torch import load_file

from merging import TaskVector, merge
from merging.sources import parse_size
from modular.checkpoint import SafetensorsCheckpoint, ShardedWriter


def test_writer_round_trips_every_dtype(tmp_path):
    tensors = {
        "a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
        "d": torch.tensor(2.5, dtype=torch.float16), "e": torch.tensor([True, False]),
    }
    writer = ShardedWriter(tmp_path, [(n, t.shape, t.dtype) for n, t in tensors.items()], max_shard_bytes=40)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()
    checkpoint = SafetensorsCheckpoint(tmp_path)
    assert len(checkpoint.files) > 1
    for name, tensor in tensors.items():
        assert torch.equal(checkpoint.get(name), tensor), name
    single = tmp_path / "single"
    single.mkdir()
    writer = ShardedWriter(single, [("a", (3, 5), torch.float32)])
    writer.add("a", tensors["a"])
    writer.close()
    assert torch.equal(load_file(single / "model.safetensors")["a"], tensors["a"])


def test_writer_enforces_its_layout(tmp_path):
    writer = ShardedWriter(tmp_path, [("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    with pytest.raises(ValueError, match="got 'b' .* expected 'a'"):
        writer.add("b", torch.zeros(2))
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 planned tensors were not written"):
        writer.close()


def test_output_dtype_and_non_float_tensors(llama_folders, tmp_path):
    base, fts = llama_folders
    out = merge("task_arithmetic", base, [TaskVector.from_models(base, fts[0])], out=tmp_path / "m", dtype="bfloat16", progress=False)
    checkpoint = SafetensorsCheckpoint(out)
    assert {checkpoint.get(n).dtype for n in checkpoint.names()} == {torch.bfloat16}
    assert '"dtype": "bfloat16"' in (out / "config.json").read_text()


def test_unknown_parameters_and_methods_are_named(llama_folders):
    base, fts = llama_folders
    tv = TaskVector.from_models(base, fts[0])
    with pytest.raises(ValueError, match="unknown key.* gamma for merge method 'ties'; allowed: weight, density, lambda, normalize, rescale"):
        merge("ties", base, [tv], gamma=1)
    with pytest.raises(KeyError, match="unknown merge method 'frankenmerge'"):
        merge("frankenmerge", base, [tv])


def test_parse_size():
    assert parse_size("500MB") == 500_000_000 and parse_size("1GiB") == 2**30 and parse_size(123) == 123
    assert parse_size("5B") == 5_000_000_000 and parse_size("20K") == 20_000  # mergekit's --out-shard-size
    with pytest.raises(ValueError, match="expected bytes or a size"):
        parse_size("lots")
