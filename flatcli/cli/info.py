"""``flatcli info``: what a checkpoint is, and (with --evaluate) how well it does."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatcli.cli.common import (DataDirOpt, DataOpt, DepthOpt, ModelOpt, ReplicaOpt, TrustPickleOpt, WidthOpt,
                                parse_replica, stderr_console, to_json, write_output)


def info(
    checkpoint: Annotated[Path, typer.Argument(help="A run folder, a .safetensors/.pt/.pth file or a TorchScript archive.")],
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Also measure train/test loss and error.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Write JSON to stdout instead of the table.")] = False,
    model: ModelOpt = None,
    width: WidthOpt = 128,
    depth: DepthOpt = 2,
    data: DataOpt = None,
    data_dir: DataDirOpt = Path("data"),
    replica: ReplicaOpt = "center",
    trust_pickle: TrustPickleOpt = False,
):
    """Show a checkpoint's metadata and parameter count; --evaluate measures its loss and error.

    Example: flatcli info runs/teacher-mlp-sgd --evaluate
    """
    from flatcli.cli.options import data_spec_of, model_spec_of
    from flatcli.cli.render import table
    from flatcli.loading import load_checkpoint
    from flatcli.training import evaluate_model

    loaded = load_checkpoint(checkpoint, model_spec=model_spec_of(model, width, depth),
                             data_spec=data_spec_of(data, data_dir), trust_pickle=trust_pickle,
                             replica=parse_replica(replica))
    meta = loaded.raw.meta or {}
    report = {"checkpoint": str(checkpoint), "kind": loaded.raw.kind,
              "parameters": sum(p.numel() for p in loaded.model.parameters()),
              "model": meta.get("model") or (loaded.model_spec.to_dict() if loaded.model_spec else type(loaded.model).__name__),
              "data": loaded.data.spec.to_dict(), "loss": loaded.loss, "replicas": loaded.raw.replicas,
              "metadata": meta}
    if evaluate:
        train = evaluate_model(loaded.model, loaded.data.train, loaded.loss)
        test = evaluate_model(loaded.model, loaded.data.test, loaded.loss)
        report["evaluation"] = {"train_loss": train[0], "train_error": train[1],
                                "test_loss": test[0], "test_error": test[1]}
    if json_out:
        write_output("-", to_json(report))
        return
    console = stderr_console()
    rows = [["kind", loaded.raw.kind], ["parameters", report["parameters"]], ["model", str(report["model"])],
            ["data", loaded.data.spec.name], ["loss", loaded.loss]]
    for key in ("version", "algo", "seed", "epoch", "step", "complete"):
        if key in meta:
            rows.append([key, str(meta[key])])
    if loaded.raw.replicas:
        rows.append(["replicas", f"{loaded.raw.replicas} (center is the model; --replica 0..{loaded.raw.replicas - 1})"])
    for key, value in (meta.get("metrics") or {}).items():
        rows.append([f"recorded {key}", value])
    for key, value in report.get("evaluation", {}).items():
        rows.append([f"measured {key}", value])
    console.print(table(str(checkpoint), ["field", "value"], rows))
