"""Ingest: reading the ChatOS store into state.

Owns the record parser (``records``, pure), the durable file cursor (``tail``), the feedback sidecar (``feedback``),
the scan that commits what is new (``ingestor``), the cold-ingest parse worker (``worker``), the filesystem watcher
(``watch``) and the debouncer (``debounce``, pure).
May import: ``daemon.dataset.examples`` (the parse worker prepares the build's cache entries) and the leaves
(``state``, ``settings``, ``log``, ``faults``, ``codec``, ``proc``).
"""
