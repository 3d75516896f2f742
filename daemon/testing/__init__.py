"""Fakes of real upstreams and the daemon harness, for tests, plugin authors and the demo."""
