"""Merge methods on small tensors, against hand computations."""

import pytest
import torch

from merging import dare_linear, dare_ties, drop_and_rescale, task_arithmetic, ties, trim_magnitude

BASE = torch.zeros(2, 3)
D1 = torch.tensor([[1.0, -2.0, 3.0], [0.5, -0.1, 0.2]])
D2 = torch.tensor([[-3.0, 1.0, 1.0], [0.2, 0.3, -0.4]])
# Top 3 of 6 magnitudes: D1 keeps 1, -2, 3 (row 0); D2 keeps -3, 1, 1 (row 0). Row 1 is trimmed away.


def test_trim_magnitude_keeps_top_density():
    assert torch.equal(trim_magnitude(D1, 0.5), torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(trim_magnitude(D1, 1 / 6), torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(trim_magnitude(D1, 0.01), trim_magnitude(D1, 1 / 6))  # at least one entry is kept


def test_task_arithmetic_by_hand():
    merged = task_arithmetic(BASE + 1, [D1, D2], weights=[1.0, 0.5], lambda_=0.3)
    assert torch.allclose(merged, 1 + 0.3 * (D1 + 0.5 * D2))
    normalized = task_arithmetic(BASE, [D1, D2], weights=[1.0, 0.5], normalize=True)
    assert torch.allclose(normalized, (D1 + 0.5 * D2) / 1.5)


def test_apply_lambda_is_base_plus_lambda_times_mixed_in_base_dtype():
    from merging.methods import apply_lambda

    base = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    mixed = torch.tensor([2.0, 4.0, -1.0])
    scaled = apply_lambda(base, mixed, 0.25)
    assert scaled.dtype == torch.bfloat16 and scaled.tolist() == [1.5, -1.0, 0.25]
    assert torch.equal(apply_lambda(base.float(), mixed, 1.0), base.float() + mixed)


@pytest.mark.parametrize(
    "combine,weights,expected_row0",
    [
        # trimmed+weighted sums per column: [-2, -1, 4] -> elected signs [-, -, +].
        # col 0: only D2 (-3) agrees; col 1: only D1 (-2); col 2: both (3 and 1).
        ("mergekit", [1.0, 1.0], [-3.0, -2.0, (3 + 1) / 2]),
        ("mean", [1.0, 1.0], [-3.0, -2.0, 2.0]),
        ("sum", [1.0, 1.0], [-3.0, -2.0, 4.0]),
        # weights [1, 0.5]: weighted D2 row 0 = [-1.5, 0.5, 0.5]; sums [-0.5, -1.5, 3.5] -> [-, -, +]
        ("mergekit", [1.0, 0.5], [-1.5 / 0.5, -2.0 / 1.0, (3 + 0.5) / 1.5]),
        ("mean", [1.0, 0.5], [-1.5, -2.0, (3 + 0.5) / 2]),
        ("sum", [1.0, 0.5], [-1.5, -2.0, 3.5]),
    ],
)
def test_ties_2x3_by_hand(combine, weights, expected_row0):
    merged = ties(BASE, [D1, D2], weights=weights, density=0.5, combine=combine)
    expected = torch.tensor([expected_row0, [0.0, 0.0, 0.0]])
    assert torch.allclose(merged, expected), merged


def test_ties_lambda_scales_the_merged_delta():
    merged = ties(BASE + 2, [D1, D2], density=0.5, lambda_=0.3, combine="sum")
    assert torch.allclose(merged, 2 + 0.3 * torch.tensor([[-3.0, -2.0, 4.0], [0.0, 0.0, 0.0]]))


def test_ties_rejects_unknown_combine():
    with pytest.raises(ValueError, match="combine='median' is not allowed"):
        ties(BASE, [D1, D2], combine="median")


@pytest.mark.parametrize("method", [task_arithmetic, ties, dare_linear, dare_ties])
def test_merging_one_model_returns_it(method):
    base = torch.randn(4, 5)
    delta = torch.randn(4, 5)
    params = {} if method is task_arithmetic else {"density": 1.0}
    assert torch.allclose(method(base, [delta], **params), base + delta, atol=1e-6)


def test_dare_keeps_density_fraction_and_rescales_to_the_l1_norm():
    delta = torch.randn(200, 50)
    kept, mean = [], torch.zeros_like(delta)
    for seed in range(200):
        dropped = drop_and_rescale(delta, 0.3, torch.Generator().manual_seed(seed))
        survivors = dropped != 0
        kept.append(survivors.float().mean().item())
        scale = delta.abs().sum() / delta[survivors].abs().sum()  # mergekit's rescale: the undropped L1 norm
        assert torch.allclose(dropped[survivors], delta[survivors] * scale)
        assert torch.allclose(dropped.abs().sum(), delta.abs().sum())
        mean += dropped / 200
    assert abs(sum(kept) / len(kept) - 0.3) < 0.005
    # E[dropped] ≈ delta: the seed-average error shrinks like 1/sqrt(seeds) (std per entry ≈ |δ|·1.53/√200 ≈ 0.11|δ|)
    assert (mean - delta).abs().mean() < 0.15 * delta.abs().mean()
    plain = drop_and_rescale(delta, 0.3, torch.Generator().manual_seed(0), rescale=False)
    assert torch.equal(plain[plain != 0], delta[plain != 0])


def test_dare_draws_from_the_generator_it_is_given():
    args = (BASE, [D1, D2])
    draw = lambda fn, seed: fn(*args, density=0.5, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(dare_ties, 3), draw(dare_ties, 3))
    assert torch.equal(draw(dare_linear, 3), draw(dare_linear, 3))
    assert not torch.equal(draw(dare_linear, 3), draw(dare_linear, 4))


def test_dare_ties_elects_sign_after_dropping():
    # density 1 -> no drop: sign election on [-2, -1, 4 | 0.7, 0.2, -0.2] then sum of agreeing entries
    merged = dare_ties(BASE, [D1, D2], density=1.0, normalize=False)
    expected = torch.tensor([[-3.0, -2.0, 4.0], [0.7, 0.3, -0.4]])  # col 2: 0.2 - 0.4 < 0 -> D2 wins
    assert torch.allclose(merged, expected)
