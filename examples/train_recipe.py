"""Run a `modular train` recipe end to end: prepare real text and a tokenizer, then train.

    python examples/train_recipe.py                 # prepare + train in this process
    python examples/train_recipe.py --prepare-only  # then use `modular train` or the deepspeed launcher

Text: dictionary definitions from GCIDE (Debian package dict-gcide, installed on first use).
The tokenizer is a small BPE trained here on that text (no hub).
"""

import argparse
import json
from pathlib import Path

from modular.app.corpora import gcide_paragraphs, train_tokenizer
from modular.app.recipe import load_recipe
from modular.app.train import run_recipe

RECIPE = Path(__file__).parent / "recipes" / "adamoe_lisa_onebit.yaml"


def prepare(data_dir: Path, paragraphs: list[str], vocab_size: int) -> None:
    """Write train/eval JSONL (every 10th paragraph held out) and the tokenizer."""
    data_dir.mkdir(parents=True, exist_ok=True)
    train = [p for i, p in enumerate(paragraphs) if i % 10]
    held_out = paragraphs[::10]
    for name, rows in (("train", train), ("eval", held_out)):
        (data_dir / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in rows))
    train_tokenizer(train, vocab_size=vocab_size).save_pretrained(data_dir / "tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--paragraphs", type=int, default=2000, help="GCIDE paragraphs to use")
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()

    paragraphs = gcide_paragraphs()[:: 50][: args.paragraphs]  # spread over the alphabet
    prepare(args.recipe.parent / "data", paragraphs, vocab_size=512)
    if not args.prepare_only:
        final = run_recipe(load_recipe(args.recipe))
        print(f"trained model: {final} (load it with modular.load_model)")


if __name__ == "__main__":
    main()
