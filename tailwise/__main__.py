import sys

from tailwise.cli import main

sys.exit(main())
