"""Dataset: eligible conversations into versioned, content-addressed fine-tuning datasets.

Owns example selection and encoding (``examples``), the PII scrub (``pii``, pure) and the versioned build
(``builder``: split, dedup, manifest, atomic folder).
May import: the leaves only (``state``, ``settings``, ``log``, ``faults``, ``codec``).
"""
