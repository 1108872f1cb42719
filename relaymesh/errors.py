"""Errors the ``relaymesh`` command prints as one line, never as a traceback."""

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""
