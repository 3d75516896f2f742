"""The service: the supervisor, systemd, metrics, logs and the ``modeld`` command line."""
