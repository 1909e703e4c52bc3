"""``python -m petl_lightning fit -c recipes/<method>.yaml``."""

from petl_lightning.cli import main

if __name__ == "__main__":
    main()
