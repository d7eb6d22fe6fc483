"""Train: deciding to train, running the trainer, judging its result.

Owns the policy (``policy``, pure), the chat-template table (``templates``, pure), the absolute-path job runner
(``runner``), the gate (``gate``, pure) and the training pre-flight (``doctor``).
May import: the leaves only (``state``, ``settings``, ``log``, ``faults``, ``proc``).
"""
