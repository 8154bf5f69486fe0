"""``python -m common.cli``: the ``newadj`` command."""
import sys

from common.cli import main

sys.exit(main())
