import sys

from structurednets.cli import main

sys.exit(main())
