"""flatcli plot: real local-energy and local-entropy CSVs drawn to PNG, stdin, the figure's data against the CSV,
--label, --group-by (means and stds against numpy), the other measures' CSVs, log axes, no torch imported, and
every user mistake as one line with no file left behind."""
import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clitools import assert_user_error, invoke
from flatcli import plotting
from flatcli.errors import FlatcliError
from flatcli.cli.plot import parse_labels

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
ENERGY = "checkpoint,split,sigma,samples,error_mean,error_sem,delta_error,loss_mean,loss_sem,delta_loss,nonfinite," \
         "noise,bn,loss_function,examples,seed"
ENTROPY = "checkpoint,gamma,local_entropy,local_entropy_sem,distance,loss_mean,error_mean,beta,chains,steps,burn_in," \
          "sampler,acceptance,langevin_lr,curvature,checkpoint_loss,checkpoint_error,examples,parameters," \
          "loss_function,split,seed"


@pytest.fixture(scope="module")
def energy_csv(runs):
    result = invoke("local-energy", runs / "sgd", runs / "rsgd", "--sigmas", "0,0.1,0.3", "--samples", 3,
                    "--device", "cpu", "--csv", "-")
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def entropy_csv(runs):
    result = invoke("local-entropy", runs / "sgd", runs / "rsgd", "--gammas", "1,10,100", "--steps", 8,
                    "--burn-in", 2, "--chains", 2, "--chains-per-pass", 2, "--max-examples", 64, "--device", "cpu",
                    "--csv", "-")
    assert result.exit_code == 0, result.stderr
    return result.stdout


def energy_rows(rows) -> str:
    """A local-energy CSV from (checkpoint, sigma, delta_error, error_sem, delta_loss, seed) tuples."""
    lines = [ENERGY] + [f"{c},train,{s},3,0.1,{se},{de},2.3,0.01,{dl},0,multiplicative,eval,cross-entropy,256,{seed}"
                        for c, s, de, se, dl, seed in rows]
    return "\n".join(lines) + "\n"


def table_of(text: str):
    return plotting.read_csv(io.StringIO(text))


def assert_png_with_content(path: Path):
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 20_000
    pixels = matplotlib.image.imread(str(path))[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800
    inked = (pixels.min(axis=2) < 0.9).mean()  # not blank, and not a solid block
    coloured = (pixels.max(axis=2) - pixels.min(axis=2) > 0.3).mean()  # the curves' colours are there
    assert 0.01 < inked < 0.5 and coloured > 0.001, (inked, coloured)


def curves_of(ax) -> list:
    """The data lines of the curves, in order: errorbar's data line, or the line of a mean (grouped)."""
    if ax.containers:
        return [c[0] for c in ax.containers]
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def legend(ax) -> list:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def no_output(folder: Path):
    assert [p.name for p in folder.iterdir() if p.suffix != ".csv"] == []


# -- the two measures of the issue, end to end ----------------------------------------------------------

def test_a_real_local_energy_and_local_entropy_csv_render_to_png_from_a_file_or_stdin(energy_csv, entropy_csv,
                                                                                      tmp_path):
    (tmp_path / "energy.csv").write_text(energy_csv)
    for source, stdin, out in ((tmp_path / "energy.csv", None, "energy.png"), ("-", entropy_csv, "entropy.png"),
                               ("-", energy_csv, "energy-piped.png")):
        result = invoke("plot", source, "-o", tmp_path / out, input=stdin)
        assert result.exit_code == 0, result.stderr
        assert result.stdout == "" and "2 curve(s)" in result.stderr
        assert_png_with_content(tmp_path / out)
    assert (tmp_path / "energy-piped.png").read_bytes() == (tmp_path / "energy.png").read_bytes()  # no timestamp


def test_local_energy_draws_both_panels_with_the_csvs_numbers(energy_csv):
    import csv
    rows = list(csv.DictReader(io.StringIO(energy_csv)))
    fig = plotting.draw(table_of(energy_csv))
    left, right = fig.axes
    assert left.get_ylabel().startswith("δε") and right.get_ylabel().startswith("δL")
    for ax, mean, sem in ((left, "delta_error", "error_sem"), (right, "delta_loss", "loss_sem")):
        lines = curves_of(ax)
        assert [c.get_label() for c in ax.containers] == ["sgd", "rsgd"]  # the common folder dropped
        for line, container, ckpt in zip(lines, ax.containers, ("sgd", "rsgd")):
            mine = sorted((float(r["sigma"]), float(r[mean]), float(r[sem])) for r in rows
                          if r["checkpoint"].rsplit("/", 1)[-1] == ckpt)
            np.testing.assert_array_equal(line.get_xdata(), [m[0] for m in mine])
            np.testing.assert_array_equal(line.get_ydata(), [m[1] for m in mine])
            bars = container.lines[2][0].get_segments()  # one vertical segment per point: y − sem … y + sem
            np.testing.assert_allclose([b[1, 1] - b[0, 1] for b in bars], [2 * m[2] for m in mine], rtol=1e-12)
    caption = fig.get_supxlabel()
    assert "± 1 standard error over the noise draws" in caption and "3 draws per σ" in caption
    assert "noise multiplicative" in caption and "seed 0" in caption


def test_local_entropy_panels_log_gamma_and_flags_points_below_the_checkpoint_loss():
    rows = [("runs/a", g, -0.01 * g, 0.001, 0.1 / g, 0.5 if g < 100 else 0.3) for g in (1, 10, 100)]
    text = "\n".join([ENTROPY] + [f"{c},{g},{s},{se},{d},{lm},0.1,64,2,8,2,mala,0.6,0.01,0.4,0.4,0.1,64,938,"
                                  f"cross-entropy,train,0" for c, g, s, se, d, lm in rows]) + "\n"
    fig = plotting.draw(table_of(text))
    s_axes, d_axes = fig.axes
    assert s_axes.get_xscale() == d_axes.get_xscale() == "log" and s_axes.get_ylabel().startswith("s(γ)")
    marks = [line for line in s_axes.get_lines() if line.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [100.0]  # ⟨L(w')⟩ 0.3 < L(w) 0.4 only at γ 100
    assert "not at a minimum" in fig.get_supxlabel() and "chains 2" in fig.get_supxlabel()
    assert plotting.draw(table_of(text), logx=False).axes[0].get_xscale() == "linear"


def test_pdf_and_svg_by_the_suffix(energy_csv, tmp_path):
    for out, magic in (("c.pdf", b"%PDF"), ("c.SVG", b"<?xml")):
        result = invoke("plot", "-", "-o", tmp_path / out, input=energy_csv)
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / out).read_bytes().startswith(magic)
    assert b"<svg" in (tmp_path / "c.SVG").read_bytes()


# -- legend names, grouping, styles, axes --------------------------------------------------------------

def test_label_renames_by_the_shown_or_the_full_name():
    text = energy_rows([(f"/x/runs/{c}", s, 0.01, 0.001, 0.02, 0) for c in ("sgd", "esgd") for s in (0, 0.1)])
    fig = plotting.draw(table_of(text), labels=parse_labels(["sgd=SGD (lr 0.1)", "/x/runs/esgd=eSGD=L5"]))
    assert legend(fig.axes[0]) == ["SGD (lr 0.1)", "eSGD=L5"]
    assert [c.get_label() for c in fig.axes[1].containers] == ["SGD (lr 0.1)", "eSGD=L5"]


def test_group_by_a_regex_averages_seeds_into_mean_and_std_bands():
    values = {("sgd", 0): [0.01, 0.04], ("sgd", 1): [0.02, 0.07], ("sgd", 2): [0.03, 0.05],
              ("esgd", 0): [0.00, 0.01], ("esgd", 1): [0.02, 0.03]}
    rows = [(f"runs/{a}-seed{k}", s, v[j], 0.001, 2 * v[j], 0) for (a, k), v in values.items()
            for j, s in enumerate((0.1, 0.2))]
    fig = plotting.draw(table_of(energy_rows(rows)), group_by=r"-seed\d+$")
    ax = fig.axes[0]
    assert legend(ax) == ["sgd (n=3)", "esgd (n=2)"]
    for line, band, algo in zip(curves_of(ax), ax.collections, ("sgd", "esgd")):
        runs = np.array([v for (a, _), v in values.items() if a == algo])  # (runs, σ)
        np.testing.assert_allclose(line.get_ydata(), runs.mean(axis=0), rtol=1e-12)
        top = band.get_paths()[0].vertices[:, 1].max(), band.get_paths()[0].vertices[:, 1].min()
        spread = runs.std(axis=0, ddof=1)
        assert top[0] == pytest.approx((runs.mean(axis=0) + spread).max())
        assert top[1] == pytest.approx((runs.mean(axis=0) - spread).min())
    assert "± 1 std" in fig.get_supxlabel() and "standard error" not in fig.get_supxlabel()


def test_concatenated_seeds_are_separate_curves_until_grouped_by_checkpoint():
    one = energy_rows([("runs/sgd", s, 0.01 * (1 + seed) * s, 0.001, 0.0, seed) for s in (0, 1) for seed in (0,)])
    two = energy_rows([("runs/sgd", s, 0.01 * (1 + seed) * s, 0.001, 0.0, seed) for s in (0, 1) for seed in (1,)])
    table = table_of(one + two)  # cat one.csv two.csv: the second header line is skipped
    assert [c.label for c in plotting.curves(table)][:2] == ["sgd · seed=0", "sgd · seed=1"]
    assert "seed 0" not in plotting.caption(table, plotting.curves(table), None)
    grouped = plotting.curves(table, group_by="checkpoint")
    assert [(c.label, c.runs, c.y) for c in grouped][0] == ("sgd", 2, [0.0, 0.015])
    assert grouped[0].err[1] == pytest.approx(np.std([0.01, 0.02], ddof=1))
    by_column = plotting.curves(table, group_by="noise")
    assert [c.label for c in by_column] == ["noise=multiplicative", "noise=multiplicative"]


def test_identical_curves_get_distinct_markers_and_dashes():
    text = energy_rows([(c, s, 0.01 * s, 0.0, 0.0, 0) for c in ("a", "b", "c", "d", "e") for s in (0, 1)])
    lines = curves_of(plotting.draw(table_of(text)).axes[0])
    assert len(lines) == 5
    assert len({line.get_marker() for line in lines}) == 5 and len({line.get_linestyle() for line in lines}) == 4
    assert all(line.get_markerfacecolor() == "none" for line in lines)  # hollow: a marker under another shows
    assert all(list(line.get_ydata()) == [0.0, 0.01] for line in lines)


def test_log_axes_become_symmetric_log_where_values_include_zero_or_negatives():
    text = energy_rows([("a", s, de, 0.001, abs(de) + 0.001, 0) for s, de in ((0, 0.0), (0.1, -0.01), (0.2, 0.03))])
    left, right = plotting.draw(table_of(text), logx=True, logy=True).axes
    assert left.get_xscale() == "symlog" and left.get_yscale() == "symlog"  # σ = 0, δε ≤ 0
    assert right.get_yscale() == "log"  # δL > 0 everywhere
    flat = plotting.draw(table_of(text)).axes[0]
    assert flat.get_xscale() == flat.get_yscale() == "linear"


def test_the_other_measures_csvs_are_recognised_and_drawn(tmp_path):
    csvs = {
        "hessian": ("checkpoint,quantity,index,value,sem,at,probes,seed\n"
                    "a,eigenvalue,1,5.0,,,10,0\na,eigenvalue,2,3.0,,,10,0\na,trace,0,20.0,1.5,,10,0\n"
                    "b,eigenvalue,1,4.0,,,10,0\nb,eigenvalue,2,2.5,,,10,0\nb,trace,0,18.0,1.0,,10,0\n"
                    "a,density,0,0.1,,-1.0,10,0\na,density,1,0.5,,0.0,10,0\na,density,2,0.2,,1.0,10,0\n",
                    ["top eigenvalues", "trace", "density"]),
        "sharpness": ("checkpoint,kind,norm,adaptive,rho,m,sharpness,sem,seed\n"
                      "a,worst-case,l2,True,0.01,256,0.1,,0\na,worst-case,l2,True,0.05,256,0.4,,0\n"
                      "a,average-case,l2,True,0.01,256,0.01,0.002,0\na,average-case,l2,True,0.05,256,0.03,0.004,0\n",
                      ["kind worst-case", "kind average-case"]),
        "pac-bayes": ("checkpoint,noise,target,sigma,flatness,probes\n"
                      "a,magnitude-aware,0.1,0.05,400,12\nb,magnitude-aware,0.1,0.1,100,12\n", ["", ""]),
        "bp-local-entropy": ("checkpoint,coupling,overlap,distance,local_entropy,iterations,converged,seed\n"
                             "a,1,0.5,0.25,-0.2,40,True,0\na,10,0.9,0.05,-0.02,60,False,0\n", [""]),
    }
    for name, (text, titles) in csvs.items():
        table = table_of(text)
        assert table.kind.name == name
        fig = plotting.draw(table)
        assert [ax.get_title() for ax in fig.axes] == titles, name
        if name == "hessian":  # four panels, one of them categorical
            plotting.save(fig, tmp_path / f"{name}.png")
            assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG
    trace = plotting.draw(table_of(csvs["hessian"][0])).axes[1]
    assert [t.get_text() for t in trace.get_xticklabels()] == ["a", "b"]  # one point per checkpoint
    assert [list(line.get_ydata()) for line in curves_of(trace)] == [[20.0], [18.0]]


def test_plot_imports_no_torch_and_its_help_no_matplotlib(energy_csv, tmp_path):
    (tmp_path / "e.csv").write_text(energy_csv)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, heavy in ((["plot", tmp_path / "e.csv", "-o", tmp_path / "e.png"], {"torch", "torchvision"}),
                        (["plot", "--help"], {"torch", "torchvision", "numpy", "matplotlib"})):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "flatcli", *map(str, args)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "flatcli" in imported and not imported & heavy, imported & heavy
    assert (tmp_path / "e.png").read_bytes()[:8] == PNG


# -- mistakes: one line, nothing written --------------------------------------------------------------

@pytest.mark.parametrize("text, args, fragments", [
    ("", [], ["is empty"]),
    (ENERGY + "\n", [], ["no rows", "local-energy"]),
    ("a,b\n1,2\n", [], ["not one flatcli can plot", "header: a,b", "local-energy"]),
    (energy_rows([("a", "x", 0, 0, 0, 0)]), [], ["sigma", "'x'", "not a number"]),
    (energy_rows([("a", 0, 0, 0, 0, 0)]), ["--label", "nolabel"], ["--label 'nolabel'", "OLD=NEW"]),
    (energy_rows([("a", 0, 0, 0, 0, 0)]), ["--label", "zz=Z"], ["--label 'zz'", "names no curve", "curves: a"]),
    (energy_rows([("a", 0, 0, 0, 0, 0)]), ["--group-by", "-seed[0-9]+$"], ["--group-by", "matches no curve"]),
    (energy_rows([("a", 0, 0, 0, 0, 0)]), ["--group-by", "(seed"], ["--group-by", "valid regex"]),
    (energy_rows([("a", 0, 0, 0, 0, 0)]), ["--group-by", "delta_error"], ["--group-by", "measured column"]),
    (energy_rows([("a", 0, 0, 0, 0, 0)] * 2), [], ["two rows for 'a' at sigma=0", "--group-by 'checkpoint'"]),
    (energy_rows([("a", 0, 0, 0, 0, 0), ("b", 0, 0, 0, 0, 0)]), ["--label", "a=X", "--label", "b=X"],
     ["both be named 'X'", "--group-by COLUMN|REGEX"]),
])
def test_a_bad_csv_or_option_is_one_line_and_writes_nothing(tmp_path, text, args, fragments):
    (tmp_path / "in.csv").write_text(text)
    for source, stdin in ((tmp_path / "in.csv", None), ("-", text)):
        result = invoke("plot", source, "-o", tmp_path / "out.png", *args, input=stdin)
        assert_user_error(result, *fragments)
        no_output(tmp_path)


@pytest.mark.parametrize("out, fragments", [("fig.jpg", ["--out", "suffix .jpg", ".png, .pdf or .svg"]),
                                            ("fig", ["--out", "no suffix"]),
                                            ("missing/fig.png", ["does not exist"])])
def test_a_bad_output_is_refused_before_reading(tmp_path, out, fragments):
    result = invoke("plot", tmp_path / "never-read.csv", "-o", tmp_path / out)  # the CSV does not even exist
    assert_user_error(result, *fragments)
    no_output(tmp_path)


def test_a_missing_csv_or_a_folder_is_one_line(tmp_path):
    assert_user_error(invoke("plot", tmp_path / "nope.csv", "-o", tmp_path / "a.png"), "does not exist")
    assert_user_error(invoke("plot", tmp_path, "-o", tmp_path / "a.png"), "is a folder")
    no_output(tmp_path)


def test_a_terminal_on_stdin_is_refused_rather_than_waited_on():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    with pytest.raises(FlatcliError, match="nothing is piped into stdin"):
        plotting.read_csv(Terminal(ENERGY))


def test_without_matplotlib_the_error_names_the_extra(energy_csv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = invoke("plot", "-", "-o", tmp_path / "a.png", input=energy_csv)
    assert_user_error(result, "matplotlib", "pip install 'flatcli[plot]'")
    no_output(tmp_path)


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(energy_csv, tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    (tmp_path / "a.png").write_bytes(b"old figure")

    def full_disk(self, path, **kw):
        Path(path).write_bytes(PNG + b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", full_disk)
    result = invoke("plot", "-", "-o", tmp_path / "a.png", input=energy_csv)
    assert_user_error(result, "No space left", "previous version is kept")
    assert (tmp_path / "a.png").read_bytes() == b"old figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no temporary left beside it
