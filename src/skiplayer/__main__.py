import sys

from skiplayer.cli import main

sys.exit(main())
