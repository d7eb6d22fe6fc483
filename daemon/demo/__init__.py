"""Demo: the embedded default (a generated ChatOS store, a tiny local base model) that ``chatos-retrain demo`` runs.

May import: anything below ``cli`` (it sits beside ``api``).
"""
