"""Running the CLI in-process, as a user would, with stdout and stderr kept apart."""
import torch
from typer.testing import CliRunner

from flatcli.cli import app


def invoke(*args, input=None):
    """Run ``flatcli ARGS`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def assert_user_error(result, *fragments):
    """A user mistake: exit 2, exactly one line on stderr starting with 'error:', no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
