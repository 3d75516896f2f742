"""The pure core: model, health, scoring, policy, registry. No I/O, no clock, no awaits."""
