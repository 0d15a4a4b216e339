import json

import pytest
import torch
from safetensors.torch import save_file

from modular.checkpoint import CheckpointError, SafetensorsCheckpoint, atomic_output_dir


def test_sharded_checkpoint_reads_tensors_by_name(tiny, tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert len(ckpt.files) > 1
    state = model.state_dict()
    for name, tensor in ckpt.get_many(["model.embed_tokens.weight", "lm_head.weight"]):
        assert torch.equal(tensor, state[name])


def test_missing_shard_and_pickles_are_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard-1.safetensors"):
        SafetensorsCheckpoint(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safetensors only"):
        SafetensorsCheckpoint(pickled)


def test_unknown_tensor_name(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'b'"):
        SafetensorsCheckpoint(tmp_path).get("b")


def test_atomic_output_dir_never_loses_what_was_there(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("crash mid-write")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert [p.name for p in out.iterdir()] == ["b.txt"]
