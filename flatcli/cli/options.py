"""Turning the checkpoint-related options shared by info and the measurements into loader arguments."""
from pathlib import Path
from typing import Optional

from flatcli.data import DataSpec
from flatcli.models import ModelSpec


def model_spec_of(model: Optional[str], width: int, depth: int) -> Optional[ModelSpec]:
    return ModelSpec(name=model, width=width, depth=depth) if model else None


def data_spec_of(data: Optional[str], data_dir: Path, data_seed: int = 0, **image_options) -> Optional[DataSpec]:
    """The DataSpec of --data (None without it); ``image_options``: resize, crop, normalize, in_memory, workers."""
    return DataSpec(name=data, data_dir=str(data_dir), seed=data_seed, **image_options) if data else None
