"""`python -m ami_janitor.cli`."""

from ami_janitor.cli import main

raise SystemExit(main())
