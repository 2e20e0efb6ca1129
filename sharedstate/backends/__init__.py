"""Where the dictionary lives: the backends a ``State`` delegates to.

``base.Backend`` is the protocol; ``local`` talks to a sharedstate server process, ``redis`` to a Redis or
Valkey server (redis-py is imported only when a Redis URL is used). ``sharedstate.connect()`` picks one
from the address.
"""
