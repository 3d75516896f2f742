"""``python -m daemon`` runs ``modeld``."""

from .cli import main

raise SystemExit(main())
