"""The paper's findings at small scale, in one command, on the embedded digits data (CPU):

    python -m utils.analysis.findings --out docs/results

runs, through the real training entry point (`python -m utils.train`, the program step1/run.sh
and step2/run.sh launch) with `--analysis-every`, on scikit-learn's digits exported by the demo
(demo_output/data) and distilling from the demo's ResNet-34 teacher (both made if missing):

  - Adam against SGD (momentum 0.9, at the trainer's default lr 0.1 and at 0.01) in step 1
    (from the same initialization) and in step 2 (all from the step-1 Adam model), the other
    settings those of the recipe;
  - a step-1 weight-decay sweep with Adam: 0, 5e-6 (the recipe: the Adam step-1 run), 1e-5,
    5e-5, 1e-4;

then writes OUT/results.md (the table: accuracy, FF, C2I, saturation, dead weights...),
OUT/results.json and PNG plots of the measurements over training (needs matplotlib, an optional
extra). Runs live under --work (default demo_output/analysis/); a finished run is not run again,
an interrupted one resumes, a run whose loss turns NaN is stopped after that epoch.
`--report-only` rewrites the table and plots from the logs.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

from utils.cli import Parser, exit_on_error
from utils.errors import ConfigError, UserError
from utils.logger import read_records
from utils.recipe import LEARNING_RATE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The runs, in the order they are run (most telling first). 'init': the run whose
# model_best.pth.tar a step-2 run starts from.
RECIPE_WD1 = 5e-6
WD_SWEEP = (0.0, 5e-6, 1e-5, 5e-5, 1e-4)


def _wd_name(wd: float) -> str:
    return "0" if wd == 0 else f"{wd:.0e}".replace("e-0", "e-")


def default_runs() -> list[dict]:
    runs = [
        dict(name="s1-adam", step=1, optimizer="adam", weight_decay=RECIPE_WD1,
             groups=("optimizer", "weight_decay")),
        dict(name="s2-adam", step=2, optimizer="adam", weight_decay=0.0, init="s1-adam",
             groups=("optimizer",)),
        # SGD (momentum 0.9) at the trainer's default lr 0.1 and at 0.01, whose steps are about
        # Adam's size here (lr * |g| * 1/(1 - momentum) ~ 1e-3).
        dict(name="s2-sgd", step=2, optimizer="sgd", weight_decay=0.0, init="s1-adam",
             groups=("optimizer",)),
        dict(name="s2-sgd-lr0.01", step=2, optimizer="sgd", learning_rate=0.01, weight_decay=0.0,
             init="s1-adam", groups=("optimizer",)),
        dict(name="s1-sgd", step=1, optimizer="sgd", weight_decay=RECIPE_WD1, groups=("optimizer",)),
        dict(name="s1-sgd-lr0.01", step=1, optimizer="sgd", learning_rate=0.01,
             weight_decay=RECIPE_WD1, groups=("optimizer",)),
    ]
    for wd in WD_SWEEP:
        if wd != RECIPE_WD1:
            runs.append(dict(name=f"s1-adam-wd{_wd_name(wd)}", step=1, optimizer="adam",
                             weight_decay=wd, groups=("weight_decay",)))
    return runs


# --------------------------------------------------------------------------------------------
# Reading the logs and writing the table (tested on fake JSON lines)
# --------------------------------------------------------------------------------------------

def read_log(path: str) -> list[dict]:
    """The per-epoch JSON lines of a run (log.jsonl), one per epoch (a repeated epoch, written
    again after a resume, keeps its last line), in epoch order."""
    by_epoch = {}
    if os.path.isfile(path):
        for rec in read_records(path)[0]:  # a damaged line (a crash mid-write) is no epoch's
            by_epoch[rec.get("epoch", len(by_epoch))] = rec
    records = [by_epoch[e] for e in sorted(by_epoch)]
    for r in records:  # the spread of |g| and of |step| (90th over 10th percentile)
        for key in ("grad_abs", "step_abs"):
            lo, hi = r.get(f"{key}_p10"), r.get(f"{key}_p90")
            if _finite(lo) and _finite(hi) and lo > 0:
                r[f"{key.split('_')[0]}_spread"] = hi / lo
    return records


def _mean(records, key):
    """Mean over the epochs that trained (lr > 0: the linear schedule's last epoch has lr 0,
    where nothing moves and FF is 0 by construction)."""
    values = [r[key] for r in records if _finite(r.get(key)) and r.get("lr", 1) > 0]
    return sum(values) / len(values) if values else None


def _gmean(records, key):
    """Geometric mean over the epochs with lr > 0 (for ratios spanning decades)."""
    values = [r[key] for r in records if _finite(r.get(key)) and r[key] > 0 and r.get("lr", 1) > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _last(records, key):
    for r in reversed(records):
        if _finite(r.get(key)):
            return r[key]
    return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def diverged_epoch(records: list[dict]) -> int | None:
    """The first epoch whose train or val loss is not finite (the run diverged), or None."""
    for r in records:
        if any(k in r and not _finite(r[k]) for k in ("train_loss", "val_loss")):
            return r.get("epoch")
    return None


MEASUREMENTS = ("ff", "c2i", "saturation", "dead", "weak", "weak_step_ratio", "dead_revived",
                "grad_spread", "step_spread", "latent_gt1", "latent_abs_mean")


def summarize(run: dict, records: list[dict]) -> dict:
    """One table row: the run's settings, its accuracy and its measurements over training.

    FF, saturation, dead, weak and the weak-gradient step ratio are averaged over the epochs
    that trained (lr > 0; each epoch's value is already the mean over its measured iterations),
    the p90/p10 spreads of |g| and |step| geometrically;
    C2I, |W| > 1 and the accuracies are the values at the end. A run whose loss became NaN
    gets its accuracies but no measurements (the weights are NaN), and a note."""
    row = {
        "run": run["name"], "step": run["step"], "optimizer": run["optimizer"],
        "lr": run.get("learning_rate", LEARNING_RATE[run["optimizer"]]),  # or the trainer's
        "weight_decay": run["weight_decay"], "init": run.get("init"), "epochs": len(records),
        "best_top1": _last(records, "best_top1"), "final_top1": _last(records, "val_top1"),
        "ff": _mean(records, "ff"), "c2i": _last(records, "c2i"),
        "saturation": _mean(records, "saturation"), "dead": _mean(records, "dead"),
        "weak": _mean(records, "weak"),
        "weak_step_ratio": _mean(records, "weak_step_ratio"),
        "grad_spread": _gmean(records, "grad_spread"),
        "step_spread": _gmean(records, "step_spread"),
        "dead_revived": _mean(records, "dead_revived"),
        "latent_gt1": _last(records, "latent_gt1"),
        "latent_abs_mean": _last(records, "latent_abs_mean"),
        "train_time": sum(r.get("epoch_time", 0.0) for r in records),
        "note": "",
    }
    bad = diverged_epoch(records)
    if bad is not None:
        for key in MEASUREMENTS:
            row[key] = None
        row["note"] = f"diverged: NaN loss in epoch {bad + 1}"
    return row


def _fmt(v, kind):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if kind == "pct":
        return f"{v:.2f}"
    if kind == "ratio":          # fractions shown in percent
        return f"{100 * v:.3f}%" if v < 0.01 else f"{100 * v:.2f}%"
    if kind == "wd":
        return "0" if v == 0 else f"{v:g}"
    if kind == "x":
        return f"{v:.2f}"
    if kind == "sci":
        return f"{v:.1e}" if v >= 1000 else f"{v:.0f}"
    if kind == "s":
        return f"{v:.0f}"
    return str(v)


TABLE_COLUMNS = [
    ("run", "run", None), ("step", "step", None), ("optimizer", "optimizer", None),
    ("lr", "lr", "wd"), ("weight_decay", "weight decay", "wd"), ("epochs", "epochs", None),
    ("best_top1", "val top-1 best (%)", "pct"), ("final_top1", "val top-1 final (%)", "pct"),
    ("ff", "FF", "ratio"), ("c2i", "C2I", "ratio"), ("saturation", "saturation", "ratio"),
    ("dead", "dead", "ratio"), ("weak", "weak", "ratio"),
    ("weak_step_ratio", "weak-grad step ratio", "x"), ("grad_spread", "\\|g\\| p90/p10", "sci"),
    ("step_spread", "\\|step\\| p90/p10", "sci"),
    ("latent_gt1", "\\|W\\|>1", "ratio"), ("train_time", "train time (s)", "s"), ("note", "note", None),
]


def results_table(rows: list[dict]) -> str:
    """The markdown table of `rows` (dicts from `summarize`)."""
    head = "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    rule = "| " + " | ".join("---" for _ in TABLE_COLUMNS) + " |"
    body = ["| " + " | ".join(_fmt(row.get(key), kind) for key, _, kind in TABLE_COLUMNS) + " |"
            for row in rows]
    return "\n".join([head, rule, *body])


def write_results(out: str, rows: list[dict], settings: dict, plots: list[str]) -> str:
    """OUT/results.md (settings, table, definitions, plots) and OUT/results.json."""
    os.makedirs(out, exist_ok=True)
    lines = [
        "# AdamBNN's analysis at small scale: results",
        "",
        "Written by `python -m utils.analysis.findings` (definitions and discussion: the "
        "repository's docs/analysis.md).",
        "",
        "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".",
        "",
        results_table(rows),
        "",
        "FF, saturation, dead, weak and the weak-gradient step ratio are means over the epochs "
        "with lr > 0 (the linear schedule's last epoch has lr 0) of each epoch's mean over its "
        "measured iterations, the p90/p10 spreads their geometric means; C2I and |W|>1 are at "
        "the end of the run. C2I is measured against the run's starting weights (step 1: the initialization, "
        "step 2: the step-1 model). Weight statistics leave out the kernel taps that see only "
        "zero padding at 32x32 (see docs/analysis.md).",
    ]
    if plots:
        lines += ["", *[f"![{os.path.splitext(p)[0]}]({p})" for p in plots]]
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
    return path


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

# Shown for every epoch; the others only for epochs with lr > 0 (nothing moves at lr 0).
_AT_END = ("val_top1", "c2i", "latent_abs_mean", "latent_gt1")

PLOT_METRICS = [("val_top1", "val top-1 (%)", False), ("ff", "FF ratio", True),
                ("c2i", "C2I ratio", False), ("saturation", "activation saturation", False),
                ("dead", "dead (zero-gradient) weights", True),
                ("weak", "weak-gradient weights", False),
                ("weak_step_ratio", "weak-grad / mean step", False),
                ("grad_spread", "|g|: p90 / p10", True), ("step_spread", "|step|: p90 / p10", True),
                ("latent_abs_mean", "mean |W| (latent)", False)]


def plot_runs(runs: list[dict], logs: dict, path: str, title: str, metrics=PLOT_METRICS) -> bool:
    """One small PNG: for each metric, its per-epoch value for each run (False without
    matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = [m for m in metrics if any(m[0] in r for run in runs for r in logs.get(run["name"], []))]
    cols = 4
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.1 * cols, 2.5 * nrows), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    for ax, (key, label, log_scale) in zip(axes.flat, metrics):
        plotted = []
        for i, run in enumerate(runs):
            recs = logs.get(run["name"], [])
            bad = diverged_epoch(recs)
            recs = [r for r in recs if _finite(r.get(key)) and (key in _AT_END or r.get("lr", 1) > 0)
                    and (bad is None or key == "val_top1")]
            x = [r["epoch"] + 1 for r in recs]
            y = [r[key] for r in recs]
            plotted += y
            ax.plot(x, y, styles[(i // 10) % len(styles)], marker="o", markersize=2.5,
                    linewidth=1.2, label=run["name"] + (" (diverged)" if bad is not None else ""))
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("epoch", fontsize=7)
        if log_scale and plotted and min(plotted) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=7, ncol=1,
               bbox_to_anchor=(0.99, 0.02), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return True


def plot_layers(runs: list[dict], logs: dict, path: str, title: str) -> bool:
    """Per-layer FF and saturation (means over the epochs) for some runs, one small PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.8))
    for ax, prefix, label in zip(axes, ("saturation/", "ff/", "dead/"),
                                 ("saturation per layer", "FF per layer", "dead per layer")):
        for run in runs:
            recs = logs.get(run["name"], [])
            if diverged_epoch(recs) is not None:
                continue
            names = [k[len(prefix):] for k in (recs[-1] if recs else {}) if k.startswith(prefix)]
            if not names:
                continue
            vals = [_mean(recs, prefix + n) or 0.0 for n in names]
            ax.plot(range(len(names)), vals, marker="o", markersize=2.5, linewidth=1,
                    label=run["name"])
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("binary conv (input to output)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def _run(cmd, log_path=None, env=None, stop_on=None, failure_ok=None):
    """Run a command, its output to the console and to `log_path`; exit on failure unless
    `failure_ok()` says otherwise. A line for which `stop_on(line)` is true ends the command
    (then no failure)."""
    print("$ " + " ".join(cmd), flush=True)
    out = open(log_path, "a") if log_path else None
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            if out:
                out.write(line)
            if not line.startswith("Epoch: ["):    # keep the console short
                print("    " + line, end="", flush=True)
            if stop_on is not None and stop_on(line):
                proc.terminate()
                proc.wait()
                return
        rc = proc.wait()
    finally:
        if out:
            out.close()
    if rc != 0 and not (failure_ok and failure_ok()):
        raise UserError(f"a command of the findings failed ({rc}): {' '.join(cmd)}"
                        + (f"; see {log_path}" if log_path else ""))


def _env(threads: int | None = None):
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def prepare(args, env):
    """The digits export and the teacher: the demo's if they are there, else made like the demo."""
    py = sys.executable
    if not all(os.path.isdir(os.path.join(args.data, s)) for s in ("train", "val")):
        _run([py, "-m", "utils.demo.digits", "export", "--out", args.data, "--size",
              str(args.input_size)], env=env)
    teacher = args.teacher_weights
    if not os.path.isfile(teacher):
        teacher = os.path.join(args.work, "teacher", "resnet34_digits.pth")
        if not os.path.isfile(teacher):
            os.makedirs(os.path.dirname(teacher), exist_ok=True)
            _run([py, "-m", "utils.demo.digits", "teacher", "--data", args.data, "--out", teacher,
                  "--epochs", str(args.teacher_epochs), "--input-size", str(args.input_size)],
                 env=env)
    return teacher


def run_training(run: dict, args, teacher: str, env) -> float:
    """One run through `python -m utils.train`; returns its wall time (0 if already done)."""
    save = os.path.join(args.work, "runs", run["name"])
    epochs = args.epochs1 if run["step"] == 1 else args.epochs2
    done = read_log(os.path.join(save, "log.jsonl"))
    if len(done) >= epochs:
        print(f"findings: {run['name']}: {epochs} epochs already done in {save}", flush=True)
        return 0.0
    if diverged_epoch(done) is not None:
        print(f"findings: {run['name']} diverged earlier (NaN loss): not run again", flush=True)
        return 0.0
    os.makedirs(save, exist_ok=True)
    cmd = [sys.executable, "-m", "utils.train", "--step", str(run["step"]), "--data", args.data,
           "--save", save, "--epochs", str(epochs), "--batch_size", str(args.batch_size),
           "--input-size", str(args.input_size), "--teacher-weights", teacher,
           "--seed", str(args.seed), "--optimizer", run["optimizer"],
           "--weight_decay", repr(run["weight_decay"]), "--analysis-every", str(args.analysis_every),
           "-j", str(args.workers), "--print-freq", "1000"]
    if run.get("learning_rate") is not None:
        cmd += ["--learning_rate", repr(run["learning_rate"])]
    if run.get("init"):
        cmd += ["--init-checkpoint", os.path.join(args.work, "runs", run["init"], "model_best.pth.tar")]
    start = time.perf_counter()
    # A run whose loss becomes NaN is stopped by the trainer (exit code 1, nothing saved): its
    # epoch goes into log.jsonl as a NaN record, for the table and the plots.
    diverged_in = []

    def watch(line):
        found = re.search(r"the loss is not finite \(NaN or inf\) in epoch (\d+)", line)
        if found:
            diverged_in.append(int(found.group(1)))
        return False
    _run(cmd, os.path.join(args.work, "runs", f"{run['name']}.out"), env=env, stop_on=watch,
         failure_ok=lambda: bool(diverged_in))
    if diverged_in:
        with open(os.path.join(save, "log.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": diverged_in[0], "train_loss": float("nan")}) + "\n")
    elapsed = time.perf_counter() - start
    print(f"findings: {run['name']} took {elapsed:.0f} s", flush=True)
    return elapsed


def report(args, runs, wall: dict | None = None) -> str:
    logs = {run["name"]: read_log(os.path.join(args.work, "runs", run["name"], "log.jsonl"))
            for run in runs}
    def order(run):  # step-1 optimizers, step-2 optimizers, then the weight-decay sweep
        group = (run["step"] - 1) if "optimizer" in run.get("groups", ()) else 2
        return group, run["weight_decay"] if group == 2 else 0, run["optimizer"] != "adam"
    rows = [summarize(run, logs[run["name"]]) for run in sorted(runs, key=order)
            if logs[run["name"]]]
    if wall:
        for row in rows:
            if wall.get(row["run"]):
                row["wall_time"] = wall[row["run"]]
    os.makedirs(args.out, exist_ok=True)
    plots = []
    opt_runs = [r for r in runs if "optimizer" in r.get("groups", ())]
    wd_runs = sorted([r for r in runs if "weight_decay" in r.get("groups", ())],
                     key=lambda r: r["weight_decay"])
    for name, group, title in (
            ("optimizers_step1.png", [r for r in opt_runs if r["step"] == 1],
             "Adam vs SGD, step 1 (binary activations, real weights)"),
            ("optimizers_step2.png", [r for r in opt_runs if r["step"] == 2],
             "Adam vs SGD, step 2 (binary weights and activations), both from s1-adam"),
            ("weight_decay.png", wd_runs, "step-1 weight decay sweep (Adam)")):
        if group and plot_runs(group, logs, os.path.join(args.out, name), title):
            plots.append(name)
    layer_runs = [r for r in opt_runs]
    if layer_runs and plot_layers(layer_runs, logs, os.path.join(args.out, "layers.png"),
                                  "per binary conv, mean over the epochs"):
        plots.append("layers.png")
    if not plots:
        print("findings: matplotlib is not installed: no plots (pip install matplotlib)")
    settings = {"data": "scikit-learn digits (1437 train / 360 val, 32x32)",
                "epochs (step 1 / step 2)": f"{args.epochs1} / {args.epochs2}",
                "batch": args.batch_size, "analysis every": f"{args.analysis_every} iterations",
                "seed": args.seed, "lr schedule": "linear to 0 (the recipe)",
                "SGD momentum": 0.9}
    path = write_results(args.out, rows, settings, plots)
    print(results_table(rows))
    print(f"findings: wrote {path}" + (f" and {', '.join(plots)}" if plots else ""))
    return path


def get_parser():
    p = Parser(prog="python -m utils.analysis.findings", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results"),
                   help="folder for results.md, results.json and the plots")
    p.add_argument("--work", default=os.path.join(ROOT, "demo_output", "analysis"),
                   help="folder for the runs (checkpoints and logs)")
    p.add_argument("--data", default=os.path.join(ROOT, "demo_output", "data"),
                   help="the digits export (made if missing)")
    p.add_argument("--teacher-weights", default=os.path.join(ROOT, "demo_output", "teacher",
                                                             "resnet34_digits.pth"),
                   help="the demo's teacher (if missing, one is trained under --work)")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--epochs1", type=int, default=8, help="epochs of each step-1 run")
    p.add_argument("--epochs2", type=int, default=8, help="epochs of each step-2 run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--analysis-every", type=int, default=2, help="measure every N iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-j", "--workers", type=int, default=1, help="data-loading workers")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the runs (default: inherited; 1 helps on a busy machine)")
    p.add_argument("--runs", default=None,
                   help="comma-separated subset of the runs (default: all): "
                        + ", ".join(r["name"] for r in default_runs()))
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the table and plots from the runs' logs")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    with exit_on_error():
        return find(args)


def find(args):
    """Run (unless --report-only) and report the runs `args` select; returns the results.md path."""
    for name in ("out", "work", "data", "teacher_weights"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    runs = default_runs()
    if args.runs:
        wanted = set(args.runs.split(","))
        unknown = wanted - {r["name"] for r in runs}
        if unknown:
            raise ConfigError(f"--runs: unknown run(s) {sorted(unknown)}")
        runs = [r for r in runs if r["name"] in wanted]
    wall = {}
    if not args.report_only:
        env = _env(args.threads)
        start = time.perf_counter()
        teacher = prepare(args, env)
        for run in runs:
            if run.get("init") and not os.path.isfile(
                    os.path.join(args.work, "runs", run["init"], "model_best.pth.tar")):
                raise ConfigError(f"--runs: {run['name']} starts from {run['init']}, which has "
                                  "no model_best.pth.tar: include it in --runs")
            wall[run["name"]] = run_training(run, args, teacher, env)
        print(f"findings: all runs took {time.perf_counter() - start:.0f} s", flush=True)
    return report(args, runs, wall)


if __name__ == "__main__":
    main()
