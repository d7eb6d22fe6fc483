"""Dataset: eligible conversations into versioned, content-addressed fine-tuning datasets.

Owns example encoding (``examples``), the PII scrub (``pii``), which examples a version holds (``selection``:
filter, dedup, split), what it records about itself (``manifest``: digests, fingerprint, manifest), all pure, and
the versioned build (``builder``: the shell that writes and commits the atomic folder).
May import: the leaves only (``state``, ``settings``, ``log``, ``faults``, ``codec``).
"""
