"""relaymesh coordinator: shared state (registry, peer map) and direct-path coordination."""

__all__: list[str] = []
