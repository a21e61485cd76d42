"""``python -m toyvae``: the same as the ``toyvae`` console command."""

from toyvae.report.cli import main

raise SystemExit(main())
