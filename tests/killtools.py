"""Start flatcli commands as processes without paying python + torch start-up each time.

A ``multiprocessing`` forkserver imports torch (with torch._dynamo, which the optimizers pull in at their
first step: seconds on a busy machine) and the CLI once; every ``start(args)`` forks a fresh process
from it (milliseconds), which a test can then SIGKILL at any moment, as it could kill a real run.
"""
import multiprocessing
import os
import sys

_CONTEXT = None


def _flatcli(args: list[str], log: str | None, address_space: int | None) -> None:
    """The child: flatcli ARGS, stdout and stderr to ``log`` (or nowhere), the exit code as the process's;
    ``address_space``: bytes of address space it may add to what it holds (RLIMIT_AS), as ``ulimit -v``."""
    if address_space is not None:
        import resource
        with open("/proc/self/status") as f:
            in_use = int([line for line in f if line.startswith("VmSize:")][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (in_use + address_space, resource.RLIM_INFINITY))
    fd = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = ["flatcli", *args]
    from flatcli.cli import main
    main()


def context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "torch._dynamo", "typer._adapters", "flatcli.data", "flatcli.cli.train", "flatcli.cli.commands", "flatcli.training", "killtools"])
    return _CONTEXT


def start(args, log: str | None = None, address_space: int | None = None) -> multiprocessing.Process:
    process = context().Process(target=_flatcli, args=([str(a) for a in args], log and str(log), address_space))
    process.start()
    return process
