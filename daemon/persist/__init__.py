"""The state file: atomic writes, load, migrations, the lock."""
