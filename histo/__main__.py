import sys

from histo.cli import main

sys.exit(main())
