"""Run the command-line interface with ``python -m prunedoctor``."""

from prunedoctor.cli.app import main

if __name__ == "__main__":
    main()
