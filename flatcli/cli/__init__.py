"""The command line: parse, call the library, render. ``flatcli --help`` lists the commands.

``main`` is the console script. Everything it imports before a command runs is light (no torch, torchvision
or numpy), so ``--help`` and ``--version`` are instant; a command imports its heavy modules when it runs.
Ctrl-C at any moment, start-up included, prints one line and exits 130.
"""
import sys


def main() -> None:
    try:
        from flatcli.cli.commands import app
        app()
    except KeyboardInterrupt:  # before the command's own boundary (FlatcliGroup) was reached
        from flatcli.cli.common import interrupted
        interrupted()


def __getattr__(name: str):
    if name == "app":
        from flatcli.cli.commands import app
        return app
    raise AttributeError(f"module 'flatcli.cli' has no attribute {name!r}")
