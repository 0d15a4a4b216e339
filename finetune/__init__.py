"""finetune part of modular-llm (see DESIGN.md)."""

__all__: list[str] = []
