"""relaymesh region: the region map and how a client chooses its home relay."""

__all__: list[str] = []
