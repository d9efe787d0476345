"""dscalibrate: measure a model or bundle on the target before it is deployed.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int`` (exit status: 0 done, 2 bad input, named on stderr); this module only
dispatches to them.
"""

import argparse
import logging
import sys

from diffsparse.calibrate import latency, precision

# subcommand name -> module providing add_arguments(parser) and run(args); add new ones here
COMMANDS: dict = {"latency": latency, "precision": precision}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dscalibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, module in COMMANDS.items():
        sp = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None,
                            description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
