"""Shared by the finetune tests: writing `modular train` recipes."""

import pytest
import yaml


def _write_recipe(folder, defaults: dict, **sections):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**defaults, **sections}))
    return path


@pytest.fixture
def write_recipe():
    """Factory: ``write_recipe(folder, defaults, **sections)`` writes ``folder/recipe.yaml``, the
    ``defaults`` recipe with the given top-level sections replaced (``lisa=None`` writes a null),
    and returns its path. Relative paths in the recipe resolve against ``folder``."""
    return _write_recipe
