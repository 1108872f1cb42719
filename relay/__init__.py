"""relaymesh's relay node at run time: server, client, mesh links, STUN, HTTP, config.

The sans-IO protocol lives in :mod:`relay.protocol`, which imports nothing from
here; this package's own ``__init__`` stays free of imports so that importing
``relay.protocol`` loads no I/O library. What users import is :mod:`relaymesh`.
"""

__version__ = "0.1.0"
