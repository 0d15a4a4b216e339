"""OneBitAdam in one process (a world of one): warm-up is AdamW bit for bit, then frozen variance."""

import copy

import pytest
import torch

from finetune import OneBitAdam


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def test_warmup_equals_adamw_bitwise_then_departs():
    a, b = _model(), _model()
    onebit = OneBitAdam(a.parameters(), lr=1e-2, weight_decay=0.1, freeze_step=4)
    adamw = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    _train(a, onebit, 4), _train(b, adamw, 4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    _train(a, onebit, 1, seed=1), _train(b, adamw, 1, seed=1)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("preconditioned", [False, True])
def test_compression_stage_freezes_variance_and_uses_compressed_momentum(preconditioned):
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=1e-2, freeze_step=2, block_size=8, compress_preconditioned=preconditioned)
    _train(model, opt, 2)
    p = model[0].weight
    v_frozen, denom = opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["frozen_denom"].clone()
    before, m_prev = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    _train(model, opt, 1, seed=5)
    state = opt.state[p]
    assert torch.equal(state["exp_avg_sq"], v_frozen) and state["step"] == 3
    # frozen denominator = sqrt(v / (1 - beta2^2)) + eps, fixed at the freeze step
    torch.testing.assert_close(denom, (v_frozen / (1 - 0.999**2)).sqrt() + 1e-8)
    # what was sent is 1-bit: one magnitude per block of 8 elements (m, or m / denom)
    sent = state["exp_avg"] / denom if preconditioned else state["exp_avg"]
    magnitudes = sent.reshape(-1)[:8].abs()
    torch.testing.assert_close(magnitudes, magnitudes[:1].expand(8))
    # local momentum = what was compressed + the compression error (worker error feedback)
    local = 0.9 * m_prev + 0.1 * p.grad
    torch.testing.assert_close(sent + state["worker_error"], local / denom if preconditioned else local)
    torch.testing.assert_close(p.detach(), before - 1e-2 / (1 - 0.9**3) * state["exp_avg"] / denom)


def test_newly_activated_param_gets_its_own_warmup():
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=1e-2, freeze_step=2, param_warmup_steps=3)
    _train(model, opt, 3)
    w = model[2].weight
    opt.state.pop(w)  # LISA frees the state of a layer it deactivates
    _train(model, opt, 1)
    assert opt.state[w]["warmup_steps"] == 3 and opt.state[w]["step"] == 1 and "frozen_denom" not in opt.state[w]
    assert opt.state[model[0].weight]["warmup_steps"] == 2


def test_param_without_grad_is_skipped():
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=1e-2, freeze_step=1)
    model[2].requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    _train(model, opt, 3)
    assert torch.equal(model[2].weight, frozen) and model[2].weight not in opt.state


def test_state_dict_roundtrip_continues_identically():
    a = _model()
    opt = OneBitAdam(a.parameters(), lr=1e-2, freeze_step=2)
    _train(a, opt, 3)
    b = copy.deepcopy(a)
    opt_b = OneBitAdam(b.parameters(), lr=1e-2, freeze_step=2)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt_b.global_step == 3
    _train(a, opt, 3, seed=7), _train(b, opt_b, 3, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_changing_trained_sets_step_each_parameter_as_if_alone():
    """Blocks that never straddle two parameters (numel a multiple of block_size, a world of one):
    each parameter's trajectory is then its own, so one optimizer over all of them, through LISA's
    set changes, a popped state and a state_dict round trip, must equal one optimizer per parameter
    (their error buffers live in one shared flat buffer, rebuilt as the set changes)."""
    torch.manual_seed(0)
    shapes = [(8, 64), (64,), (2, 32)]  # sets {0, 1} and {0, 2}: same size, other layout
    together = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    alone = [torch.nn.Parameter(t.detach().clone()) for t in together]
    settings = dict(lr=1e-2, freeze_step=2, block_size=64)
    opt = OneBitAdam(together, **settings)
    opts = [OneBitAdam([p], **settings) for p in alone]
    g = torch.Generator().manual_seed(1)
    for step in range(14):
        active = {0, 1, 2} if step < 4 or step >= 10 else ({0, 1} if step < 7 else {0, 2})
        if step == 7:  # LISA frees a deactivated layer's state
            opt.state.pop(together[1]), opts[1].state.pop(alone[1])
        if step == 10:  # a checkpoint read back: the states' tensors are replaced
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        grads = [torch.randn(s, generator=g) for s in shapes]
        for i, (a, b) in enumerate(zip(together, alone)):
            a.grad = b.grad = grads[i].clone() if i in active else None
        opt.step()
        for o in opts:
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    for i, (a, b) in enumerate(zip(together, alone)):
        assert opt.state[a].keys() == opts[i].state[b].keys()
        assert all(torch.equal(v, opts[i].state[b][k]) for k, v in opt.state[a].items() if torch.is_tensor(v))


@pytest.mark.parametrize("freeze_step", [0, -3, 1.5])
def test_freeze_step_must_be_positive_int(freeze_step):
    with pytest.raises(ValueError, match="freeze_step"):
        OneBitAdam(_model().parameters(), freeze_step=freeze_step)


def test_mixed_devices_rejected():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))]
    with pytest.raises(ValueError, match="one device"):
        OneBitAdam(params, freeze_step=1)


def test_coordinates_without_warmup_gradient_stay_still():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(16, 8)
    opt = OneBitAdam(emb.parameters(), lr=1e-2, freeze_step=2, block_size=8)
    unseen = emb.weight[8:].detach().clone()
    for step in range(5):
        ids = torch.tensor([step % 4, 4 + step % 4]) if step < 2 else torch.arange(16)  # rows 8.. unseen in warm-up
        opt.zero_grad()
        emb(ids).pow(2).sum().backward()
        opt.step()
    assert opt.state[emb.weight]["frozen_denom"][8:].isinf().all()
    assert torch.equal(emb.weight[8:], unseen) and torch.isfinite(emb.weight).all()


def test_block_scale_is_mean_abs_and_error_never_exceeds_input():
    from finetune import Communicator

    comm = Communicator(block_size=8)  # a world of one: worker and server compression, no communication
    x = torch.tensor([8.0, -0.5, 0.5, -0.5, 0.5, 0.25, -0.25, 0.5])  # heavy-tailed: one large entry
    worker_error, server_error = torch.zeros(8), torch.zeros(8)
    out = comm.compressed_all_reduce(x.clone(), worker_error, server_error)
    # scale = ‖x‖₁ / 8 = 11 / 8; the RMS scale ‖x‖₂/√8 ≈ 2.86 would make ‖x − C(x)‖ ≈ 8.24 > ‖x‖ ≈ 8.09
    torch.testing.assert_close(out, torch.sign(x) * 11 / 8)
    torch.testing.assert_close(worker_error, x - out)
    assert worker_error.norm() ** 2 <= x.norm() ** 2 - 11**2 / 8 + 1e-4  # ‖x‖² − ‖x‖₁²/d
