"""`python -m runners.cli`: the `qwen-edit` command without its console script."""

from . import main

raise SystemExit(main())
