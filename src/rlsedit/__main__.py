"""``python -m rlsedit`` runs the command-line interface."""

from rlsedit.cli import main

raise SystemExit(main())
