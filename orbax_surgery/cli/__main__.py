"""`python -m orbax_surgery.cli`, the same as the `orbax-surgery` console script."""

import sys

from orbax_surgery.cli.main import main

if __name__ == '__main__':
    sys.exit(main())
