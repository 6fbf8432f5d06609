"""``python -m invconv``: the ``invconv`` command line (see :mod:`invconv.cli`)."""
from .cli import main

raise SystemExit(main())
