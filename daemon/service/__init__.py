"""Service: the long-running process around the cycle.

Owns the lifecycle loop (``lifecycle``: signals, scheduler, watcher -> debouncer -> cycle worker), the control
socket (``control``), the sd_notify protocol (``sdnotify``) and the systemd unit rendering (``unit``).
May import: ``cycle``, the stages and the leaves; never ``cli`` or ``api``.
"""
