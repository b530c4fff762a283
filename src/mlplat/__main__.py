"""``python -m mlplat ...`` is the ``mlplat`` command."""
import sys

from .cli import main

sys.exit(main())
