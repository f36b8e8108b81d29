"""`python -m monitor` is `podnetmon`."""

import sys

from monitor.cli import main

sys.exit(main())
