"""Scripts run by the trainer's interpreter (possibly another venv), by absolute path; the service never imports them.

They import nothing from the ``daemon`` package: everything they need arrives in their config or argv.
"""
