"""``python -m dualfuse.cli``: what the ``dualfuse`` console script runs (and ``bench --sms`` starts per SM count)."""
import sys

from . import main

sys.exit(main())
