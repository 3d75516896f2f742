"""Probing: the prober (deadlines, caps, isolation, single-flight), plugin loading, hookspecs."""
