import sys

from windflow.cli import main

# Guarded: a process started by multiprocessing's spawn (the worker's model hosts) imports
# the parent's main module again and must not run the CLI.
if __name__ == "__main__":
    sys.exit(main())
