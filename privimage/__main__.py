"""``python -m privimage`` runs the command-line interface."""

from privimage.cli import main

raise SystemExit(main())
