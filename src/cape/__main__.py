"""``python -m cape``: the same entry point as the ``cape`` console script."""

from cape.cli.app import main

if __name__ == "__main__":
    main()
