"""Image folders read when used (--in-memory no): the same numbers as in memory, and memory bounded by what is used."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from clitools import assert_user_error, invoke

pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(root, n_train, n_val=2, classes=("a", "b", "c"), sizes=((12, 12),), seed=0):
    g = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i:05}.png")
    return root


def linear_checkpoint(path, shape, classes=3):
    from safetensors.torch import save_file
    from flatcli.models import ModelSpec, build_model
    save_file(build_model(ModelSpec("linear"), shape, classes, seed=0).state_dict(), str(path))
    return path


@pytest.mark.parametrize("extra", [[], ["--max-examples", "7"], ["--resize", "14", "--crop", "10"],
                                   ["--normalize", "imagenet", "--max-examples", "5"]])
def test_streamed_and_in_memory_give_the_same_numbers(tmp_path, extra):
    folder = write_folder(tmp_path / "imgs", 5, sizes=((12, 12), (16, 13)) if "--crop" in extra else ((12, 12),))
    shape = (3, 10, 10) if "--crop" in extra else (3, 12, 12)
    ckpt = linear_checkpoint(tmp_path / "w.safetensors", shape)
    args = ["local-energy", ckpt, "--model", "linear", "--data", f"imagefolder:{folder}", "--sigmas", "0,0.2",
            "--samples", "3", "--csv", "-", *extra]
    memory, streamed = invoke(*args, "--in-memory", "yes"), invoke(*args, "--in-memory", "no")
    assert memory.exit_code == 0 and streamed.exit_code == 0, streamed.stderr
    assert memory.stdout == streamed.stdout
    assert len(memory.stdout.splitlines()) == 3


def test_streamed_folder_trains_and_is_measured(tmp_path):
    folder = write_folder(tmp_path / "imgs", 6)
    out = tmp_path / "run"
    result = invoke("train", "--data", f"imagefolder:{folder}", "--in-memory", "no", "--model", "convnet",
                    "--width", "8", "--steps", "2", "--batch-size", "4", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.stderr
    result = invoke("local-energy", out, "--in-memory", "no", "--sigmas", "0,0.1", "--samples", "2", "--csv", "-")
    assert result.exit_code == 0, result.stderr


def test_images_of_different_shapes_after_the_transform_are_one_line(tmp_path):
    folder = write_folder(tmp_path / "imgs", 2, sizes=((12, 12), (20, 9)))
    ckpt = linear_checkpoint(tmp_path / "w.safetensors", (3, 12, 12))
    assert_user_error(invoke("local-energy", ckpt, "--model", "linear", "--data", f"imagefolder:{folder}",
                             "--resize", "12", "--in-memory", "yes"), "after the transform")


PEAK = textwrap.dedent("""
    import resource, subprocess, sys
    done = subprocess.run([sys.executable, "-m", "flatcli", *sys.argv[1:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


def peak_kib(*args) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_peak_memory_of_a_streamed_folder_does_not_grow_with_its_size(tmp_path):
    """1 600 images at 160x160 after the transform take 123 MB in memory; streamed, 256 of them are read."""
    small = write_folder(tmp_path / "small", 150, n_val=1, classes=("a", "b"), sizes=((8, 8),))
    large = write_folder(tmp_path / "large", 800, n_val=1, classes=("a", "b"), sizes=((8, 8),), seed=1)
    ckpt = linear_checkpoint(tmp_path / "w.safetensors", (3, 160, 160), classes=2)
    common = [ckpt, "--model", "linear", "--resize", "180", "--crop", "160", "--max-examples", "256",
              "--sigmas", "0,0.1", "--samples", "2", "--device", "cpu"]
    base = peak_kib("local-energy", *common, "--data", f"imagefolder:{small}", "--in-memory", "no")
    streamed = peak_kib("local-energy", *common, "--data", f"imagefolder:{large}", "--in-memory", "no")
    held = peak_kib("local-energy", *common, "--data", f"imagefolder:{large}", "--in-memory", "yes")
    assert streamed <= 1.1 * base, (base, streamed)
    assert held > 1.1 * base, (base, held)  # the comparison can fail: holding the images does show
