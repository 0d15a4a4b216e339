"""modular.corpora: the sentence-transformers pooling of all-MiniLM-L6-v2, by hand."""

import torch

from modular.corpora import minilm_sentence_embedding


def test_mean_over_unpadded_tokens_then_unit_length():
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]]])  # the last position is padding
    mask = torch.tensor([[1, 1, 0]])
    # mean of the two real tokens = [2, 2] -> unit length [1/√2, 1/√2]
    expected = torch.tensor([[2 ** -0.5, 2 ** -0.5]])
    assert torch.allclose(minilm_sentence_embedding(hidden, mask), expected)
