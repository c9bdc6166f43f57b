"""``python -m sparseflex`` (what ``torchrun -m sparseflex ...`` runs): the ``sparseflex`` command."""

import sys

from .cli import main

sys.exit(main())
