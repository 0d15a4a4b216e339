"""The FFN compute meter against a hand count: an ACM forced to 2 of 4 learners, an experts block
with 2 of 4 experts, padding left out."""

import torch

from modular.acm import ACMConfig, acmize
from modular.app.compute import FFNComputeMeter
from modular.testing import tiny_model
from moe import AdaMoEConfig, FFNExpertsConfig, ffn_experts_blocks, inject_adamoe, inject_ffn_experts


def test_compute_fraction_by_hand():
    model = tiny_model("bert")  # hidden 32, intermediate 64, 2 layers
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    calibration = [{"input_ids": ids}]
    inject_ffn_experts(model, FFNExpertsConfig(num_experts=4, top_k=2, layers=[1]), calibration)
    acmize(model, ACMConfig(num_learners=4, distill_steps=1, gate_steps=1), calibration, progress=False)
    inject_adamoe(model, AdaMoEConfig(num_null_experts=2, top_k=2))
    acm = model.encoder.layer[0].intermediate
    with torch.no_grad():  # every token runs exactly 2 learners
        last = acm.gate.net[2]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0, 0.0]))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    with FFNComputeMeter(model) as meter:
        meter.run([{"input_ids": ids, "attention_mask": mask}])
    tokens = 15
    block = ffn_experts_blocks(model)[0][1]
    dense = 2 * 32 * 64 * 2  # one dense FFN, per token
    acm_flops = 2 * (2 * 32 * 16 * 2) + (2 * 32 * 64 + 2 * 64 * 5)  # 2 learners of width 16 + the gate
    expert_flops = meter.true_experts * 2 * 32 * 16 * 2 + tokens * 2 * 32 * (4 + 2)  # true picks + router (4 + 2 nulls)
    summary = meter.summary()
    assert summary["acm_histogram"] == [0, 0, tokens, 0, 0]
    assert meter.expert_tokens == tokens and meter.true_experts <= 2 * tokens
    assert block.router_flops_per_token() == 2 * 32 * 6
    assert summary["compute_fraction"] == (tokens * acm_flops + expert_flops) / (2 * tokens * dense)
    assert summary["true_experts_per_token"] == meter.true_experts / tokens
