"""``python -m training``: the trainer's command line (see training/cli.py)."""

from .cli import main

raise SystemExit(main())
