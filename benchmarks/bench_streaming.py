"""Peak memory of `local-energy --max-examples 256` on an image folder of 5 000 images against one of 500.

    python benchmarks/bench_streaming.py            # figures as in RESULTS.md

Each measurement is a fresh `python -m flatcli` process; its peak resident memory is read with getrusage. Images
are stored small (8×8 PNG) and brought to 3×160×160 by `--resize 180 --crop 160`, so that holding the 5 000 of
them takes 384 MB while the files stay tiny. Streamed (`--in-memory no`), only the 256 measured images (and a
1 000-image sample for the mean/std, read 64 at a time) are ever in memory: the target is a peak no larger than
the 500-image folder's plus 10 %. The in-memory row shows what streaming saves.
"""
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

PEAK = textwrap.dedent("""
    import resource, subprocess, sys
    done = subprocess.run([sys.executable, "-m", "flatcli", *sys.argv[1:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


def write_folder(root: Path, per_class: int, classes=("a", "b"), seed: int = 0) -> Path:
    from PIL import Image
    g = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 1)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i:05}.png")
    return root


def peak_mib(*args) -> float:
    done = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1]) / 1024


def main():
    import torch
    from safetensors.torch import save_file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flatcli.models import ModelSpec, build_model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = write_folder(tmp / "small", 250), write_folder(tmp / "large", 2500, seed=1)
        ckpt = tmp / "w.safetensors"
        save_file(build_model(ModelSpec("linear"), (3, 160, 160), 2, seed=0).state_dict(), str(ckpt))
        common = [ckpt, "--model", "linear", "--resize", "180", "--crop", "160", "--max-examples", "256",
                  "--sigmas", "0,0.1", "--samples", "2", "--device", "cpu", "--threads", "1"]
        rows = [("500 images, streamed", peak_mib("local-energy", *common, "--data", f"imagefolder:{small}", "--in-memory", "no")),
                ("5 000 images, streamed", peak_mib("local-energy", *common, "--data", f"imagefolder:{large}", "--in-memory", "no")),
                ("5 000 images, in memory", peak_mib("local-energy", *common, "--data", f"imagefolder:{large}", "--in-memory", "yes"))]
    print(f"torch {torch.__version__}; peak resident memory of `flatcli local-energy --max-examples 256`")
    for name, mib in rows:
        print(f"{name:<26}{mib:8.0f} MiB   {mib / rows[0][1]:.2f} × the 500-image folder")
    print(f"target: 5 000 streamed ≤ 1.10 × 500 streamed: {'met' if rows[1][1] <= 1.1 * rows[0][1] else 'NOT met'}")


if __name__ == "__main__":
    main()
