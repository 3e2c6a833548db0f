"""`python -m gateway` is the same as the `fieldgate` command."""

from gateway.cli import main

raise SystemExit(main())
