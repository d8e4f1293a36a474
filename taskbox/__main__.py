"""`python -m taskbox`: `taskbox mcp` starts without loading the CLI (see taskbox.mcp_stdio)."""

import sys


def main() -> None:
    from .mcp_stdio import fast_path

    if not fast_path(sys.argv[1:]):
        from .cli import main as cli_main

        cli_main()


if __name__ == "__main__":
    main()
