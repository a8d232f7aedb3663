"""``python -m privlora.cli``: the same command as the ``privlora`` console script."""

import sys

from privlora.cli.main import main

sys.exit(main())
