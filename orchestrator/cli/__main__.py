"""`python -m orchestrator.cli` (how a submitted job runs on the cluster)."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
