"""Plot local-energy curves from the CSV of ``flatcli local-energy``: δε (or δL) against σ, one line per checkpoint.

    flatcli local-energy runs/sgd runs/esgd --csv - | python examples/plot_local_energy.py -o curves.png
    python examples/plot_local_energy.py energy.csv -o curves.png --metric delta_loss

Error bars are one standard error of the mean over the noise draws (error_sem / loss_sem). Needs matplotlib
(``pip install -e ".[plot]"``); it draws without a display (Agg backend).
"""
import argparse
import csv
import sys

SEM_OF = {"delta_error": "error_sem", "delta_loss": "loss_sem"}
LABEL_OF = {"delta_error": "δε: rise of the error (a fraction)", "delta_loss": "δL: rise of the loss"}


def read_curves(lines, metric: str) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """{checkpoint: (sigmas, values, sems)} in the order the checkpoints first appear, sorted by σ."""
    reader = csv.DictReader(lines)
    need = {"checkpoint", "sigma", metric, SEM_OF[metric]}
    missing = need - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"the CSV lacks the column(s) {', '.join(sorted(missing))} — "
                         f"give it the output of 'flatcli local-energy --csv'")
    curves = {}
    for row in reader:
        try:
            point = (float(row["sigma"]), float(row[metric]), float(row[SEM_OF[metric]]))
        except (TypeError, ValueError):
            raise ValueError(f"line {reader.line_num} of the CSV is not a row of numbers — "
                             f"give it the output of 'flatcli local-energy --csv'") from None
        curves.setdefault(row["checkpoint"], []).append(point)
    if not curves:
        raise ValueError("the CSV has no rows — measure at least one checkpoint")
    return {name: tuple(map(list, zip(*sorted(points)))) for name, points in curves.items()}


def plot(curves: dict, metric: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, (sigmas, values, sems) in curves.items():
        sems = [0.0 if s != s else s for s in sems]  # NaN (one draw) → no bar
        ax.errorbar(sigmas, values, yerr=sems, marker="o", markersize=3, capsize=3, label=name)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("σ (noise level)")
    ax.set_ylabel(LABEL_OF[metric])
    ax.set_title("local energy: higher is sharper")
    ax.legend(fontsize="small")
    fig.savefig(out, dpi=150)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", help="CSV file from flatcli local-energy (default: read stdin)")
    parser.add_argument("-o", "--out", default="local_energy.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--metric", choices=sorted(SEM_OF), default="delta_error", help="what to plot")
    args = parser.parse_args(argv)
    try:
        if args.csv:
            with open(args.csv, newline="") as f:
                curves = read_curves(f, args.metric)
        else:
            curves = read_curves(sys.stdin, args.metric)
    except OSError as e:
        print(f"error: cannot read {args.csv!r} ({e.strerror}) — check the path", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot(curves, args.metric, args.out)
    print(f"wrote {args.out} ({len(curves)} checkpoint(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
