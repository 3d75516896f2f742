"""The service: everything that runs the daemon.

lifecycle (start, serve, stop, exit codes), scheduler (probing on time), timers (policy tick,
state flush, systemd status and watchdog, signals), reload, saving (state writes), events
(fan-out to logs, observers and followers), systemd, metrics, logs, and the ``modeld`` CLI.
"""
