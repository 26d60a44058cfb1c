import sys

from ablations.cli import main

sys.exit(main())
