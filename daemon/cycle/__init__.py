"""Cycle: one retraining cycle, ingest -> decide -> dataset -> train -> gate -> export -> register, as stages.

May import: every stage (``ingest``, ``dataset``, ``train``, ``publish``) and the leaves; never ``service`` or ``cli``.
"""
