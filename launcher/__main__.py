"""``python -m launcher server start|stop|status``, ``choose-profile --dataset D [--profile P]``, ``summary``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = ("server", "choose-profile", "summary")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m launcher {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "server":
        from launcher import server

        return server.main(rest)
    if command == "choose-profile":
        from pipeline import profiles

        return profiles.main(rest)
    from launcher import summary

    return summary.main(rest)


if __name__ == "__main__":
    sys.exit(main())
