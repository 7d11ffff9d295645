"""`python -m lrd_fx ...`: the `lrd-fx` command."""
import sys

from .cli import main

sys.exit(main())
