"""``python -m privlora.cli``: the same command as the ``privlora`` console script."""

import sys

from privlora.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
