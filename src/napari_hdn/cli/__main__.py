"""``python -m napari_hdn.cli`` runs the ``napari-hdn`` command."""

import sys

from . import main

sys.exit(main())
