"""``python -m model.standin``: see ``serve.py``."""

import sys

from model.standin.serve import main

sys.exit(main())
