"""The Typer application: the root command and the registry of commands (each a thin, torch-free module)."""
from typing import Annotated

import typer

import flatcli
from flatcli.cli.common import FlatcliCommand, FlatcliGroup
from flatcli.cli.compare import compare
from flatcli.cli.hessian import hessian
from flatcli.cli.info import info
from flatcli.cli.local_energy import local_energy
from flatcli.cli.local_entropy import local_entropy
from flatcli.cli.pac_bayes import pac_bayes
from flatcli.cli.plot import plot
from flatcli.cli.sharpness import sharpness
from flatcli.cli.train import train

app = typer.Typer(cls=FlatcliGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Train networks with SGD, Entropy-SGD and replicated SGD, and measure how flat their minima are.")


def version_callback(value: bool):
    if value:
        typer.echo(f"flatcli {flatcli.__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                               help="Print the version and exit.")] = False):
    """flatcli: flatness of neural-network minima (local energy, local entropy, Hessian, sharpness, PAC-Bayes)
    and entropic training."""


for name, command in (("train", train), ("info", info), ("local-energy", local_energy),
                      ("local-entropy", local_entropy), ("hessian", hessian), ("sharpness", sharpness), ("pac-bayes", pac_bayes),
                      ("compare", compare), ("plot", plot)):
    app.command(name, cls=FlatcliCommand)(command)
