"""The application layer of modular-llm: the ``modular`` CLI, the ``modular train`` recipe runner,
``modular demo`` with its offline data sources, ``modular report`` and ``modular doctor``.

Nothing in the core (``modular/``) or the methods (``modular/acm/``, ``moe/``, ``finetune/``,
``merging/``) imports this package.
"""
