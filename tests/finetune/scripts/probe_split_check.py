"""torchrun --nproc_per_node 2: the linear probe's forwards shared by the ranks give, on every rank,
the features and head of one process running them all (same thread count). Writes JSON (rank 0)."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification

from finetune.heads import fit_linear_probe, head_features
from modular.testing import tiny_config


def batches(seed: int, sizes: list[int]) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        ids = torch.randint(3, 100, (n, 6), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 1] % 3})
    return out


def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=3)).eval()


def main(path: str) -> None:
    dist.init_process_group("gloo")
    report = {}
    for sizes in ([8, 8, 8, 8, 5], [8, 3], [7]):  # an odd count, uneven sizes, a rank with no batch
        data = batches(len(sizes), sizes)
        model, calls = classifier(), torch.zeros(1, dtype=torch.long)

        def count(_module, _args, calls=calls) -> None:
            calls.add_(1)

        model.register_forward_pre_hook(count)
        alone, shared = head_features(classifier(), data), head_features(model, data, split_over_ranks=True)
        report[str(sizes)] = all(torch.equal(a, b) for a, b in zip(alone, shared))
        counts = [torch.zeros_like(calls) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, calls)
        report[f"forwards per rank {sizes}"] = [int(c) for c in counts]
    split, whole = classifier(), classifier()
    probe_split = fit_linear_probe(split, batches(0, [8, 8, 8, 6]), batches(1, [8, 8, 4]), split_over_ranks=True)
    probe_whole = fit_linear_probe(whole, batches(0, [8, 8, 8, 6]), batches(1, [8, 8, 4]))
    same_head = torch.equal(split.classifier.weight, whole.classifier.weight) and torch.equal(split.classifier.bias, whole.classifier.bias)
    heads = [torch.zeros_like(split.classifier.weight) for _ in range(dist.get_world_size())]
    dist.all_gather(heads, split.classifier.weight.detach())
    report.update(same_probe=probe_split == probe_whole and same_head, ranks_agree=all(torch.equal(h, heads[0]) for h in heads))
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
