"""``python -m daemon`` runs ``modeld``."""

from .service.cli import main

raise SystemExit(main())
