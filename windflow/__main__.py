import sys

from windflow.cli import main

# Guarded: a process started by multiprocessing's spawn imports the parent's main module
# again and must not run the CLI (the worker's model hosts start as their own module).
if __name__ == "__main__":
    sys.exit(main())
