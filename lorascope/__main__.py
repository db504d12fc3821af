"""``python -m lorascope`` runs the command line."""

from lorascope.cli import main

if __name__ == "__main__":
    main()
