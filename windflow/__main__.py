import sys

from windflow.cli import main

sys.exit(main())
