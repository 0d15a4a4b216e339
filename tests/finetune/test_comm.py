"""Sign packing and the compressed all-reduce in a world of one, checked by hand."""

from types import SimpleNamespace

import pytest
import torch

from finetune.comm import Communicator, pack_signs, skip_host_allreduce, unpack_signs


def test_pack_signs_eight_per_byte_msb_first():
    x = torch.tensor([1.0, -1, 0, -2, 3, -4, -5, 6, -1, -1, -1, -1, -1, -1, -1, 0.5])
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b10101001, 0b00000001]
    assert unpack_signs(packed).tolist() == [1, -1, 1, -1, 1, -1, -1, 1] + [-1] * 7 + [1]


def test_pack_signs_rejects_length_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_signs(torch.ones(7))


def test_world_of_one_compression_by_hand():
    comm = Communicator(block_size=8)
    x = torch.tensor([3.0, -1, 2, -2, 1, 1, -3, 0] + [0.5] * 8)
    werr, serr = torch.zeros(16), torch.zeros(16)
    out = comm.compressed_all_reduce(x.clone(), werr, serr)
    s1, s2 = 13 / 8, 0.5  # one scale per block: mean |x_b| = ||x_b||_1 / 8
    expected = torch.cat([s1 * torch.where(x[:8] >= 0, 1.0, -1.0), s2 * torch.ones(8)])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(werr, x - expected)
    torch.testing.assert_close(serr, torch.zeros(16))  # re-compressing ±s gives ±s back
    assert comm.stats.total_bytes == 0  # nothing to send in a world of one


def test_padded_length_rounds_to_whole_blocks_per_rank():
    comm = Communicator(block_size=64)
    assert comm.padded_length(1000) == (1024, 64)
    assert Communicator(block_size=None).padded_length(1001) == (1008, 1008)
    with pytest.raises(ValueError, match="not padded"):
        comm.compressed_all_reduce(torch.zeros(1000), torch.zeros(1000), torch.zeros(1000))


@pytest.mark.parametrize("block_size", [0, 12])
def test_block_size_must_be_multiple_of_8(block_size):
    with pytest.raises(ValueError, match="block_size"):
        Communicator(block_size=block_size)


def test_world_size_without_process_group_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="init_process_group"):
        Communicator()


def test_skip_host_allreduce_rejects_plain_module():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        skip_host_allreduce(torch.nn.Linear(2, 2))


def test_skip_host_allreduce_refuses_deepspeed_precision_wrappers():
    # DeepSpeed's bf16/fp16 modes hand the optimizer fp32 master copies; frozen LISA layers kept moving.
    engine = SimpleNamespace(enable_backward_allreduce=True, zero_optimization_stage=lambda: 0,
                             bfloat16_enabled=lambda: True, fp16_enabled=lambda: False)
    with pytest.raises(ValueError, match="bf16/fp16 off"):
        skip_host_allreduce(engine)
    engine.bfloat16_enabled = lambda: False
    skip_host_allreduce(engine)
    assert engine.enable_backward_allreduce is False


def test_compressed_all_reduce_reuses_its_buffers_and_follows_a_new_size():
    comm, fresh = Communicator(block_size=8), Communicator(block_size=8)
    x = torch.randn(64)
    first = comm.compressed_all_reduce(x.clone(), torch.zeros(64), torch.zeros(64))
    where, values = first.data_ptr(), first.clone()
    again = comm.compressed_all_reduce(x.clone(), torch.zeros(64), torch.zeros(64))
    assert again.data_ptr() == where and torch.equal(again, values)  # no new buffer, same result
    y = torch.randn(32)  # LISA switched layers: another length
    werr, serr, fresh_werr, fresh_serr = torch.zeros(32), torch.zeros(32), torch.zeros(32), torch.zeros(32)
    out = comm.compressed_all_reduce(y.clone(), werr, serr)
    assert torch.equal(out, fresh.compressed_all_reduce(y.clone(), fresh_werr, fresh_serr)) and torch.equal(werr, fresh_werr)
