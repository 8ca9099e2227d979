"""The end-of-pipeline report: loss curves of the training runs, and teacher vs student held-out numbers.

Training runs are read from their `metrics.jsonl` (one JSON object per line, `kind` "train" or "eval",
`step`, `loss`, ...), as written by `plmscale.training.metrics`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from plmscale.objectives import get_objective_class

METRICS = "metrics.jsonl"
RUN_OUTPUTS = ("tensorboard", "checkpoints", "model")  # what a training run's output_dir holds


def metrics_file(run: str | Path) -> Path:
    """A run's output directory or its metrics.jsonl itself."""
    path = Path(run)
    return path / METRICS if path.is_dir() else path


def read_metrics(run: str | Path) -> list[dict]:
    path = metrics_file(run)
    if not path.is_file():
        raise FileNotFoundError(f"no training metrics at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(records: list[dict], kind: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["loss"]) for r in records if r.get("kind", "train") == kind and "loss" in r]
    return [s for s, _ in points], [loss for _, loss in points]


def train_label(run: str | Path) -> str:
    """A distillation run optimizes its weighted distillation losses, a pair objective MLM + pair loss:
    neither is comparable to an MLM loss (held-out evaluation scores MLM only)."""
    config = metrics_file(run).parent / "config.yaml"
    recipe = yaml.safe_load(config.read_text()) if config.is_file() else {}
    if recipe.get("distill"):
        return "train (distillation loss)"
    if "objective" in recipe and get_objective_class(recipe["objective"]["name"]).pair_task:
        return "train (MLM + pair loss)"
    return "train"


def plot_losses(runs: dict[str, str | Path], path: str | Path) -> Path:
    """Train loss as lines and held-out loss as markers, one colour per run."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for number, (name, run) in enumerate(runs.items()):
        records, color = read_metrics(run), f"C{number}"
        ax.plot(*curve(records, "train"), color=color, alpha=0.8, label=f"{name} {train_label(run)}")
        steps, losses = curve(records, "eval")
        if steps:
            ax.plot(steps, losses, "o--", color=color, label=f"{name} held-out")
    ax.set(xlabel="optimizer step", ylabel="loss", title="plmscale: pre-training and distillation")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def loss_change(name: str, run: str | Path) -> str:
    records = read_metrics(run)
    steps, losses = curve(records, "train")
    if not steps:
        return f"{name}: no train loss logged"
    fall = losses[0] - losses[-1]
    verb = "fell" if fall >= 0 else "rose"
    line = (
        f"{name}: {train_label(run)} loss {losses[0]:.4f} (step {steps[0]}) -> {losses[-1]:.4f} (step {steps[-1]}), "
        f"{verb} by {abs(fall):.4f} ({abs(fall) / losses[0]:.1%})"
    )
    eval_steps, eval_losses = curve(records, "eval")
    if eval_steps:
        line += f"; held-out {eval_losses[0]:.4f} (step {eval_steps[0]}) -> {eval_losses[-1]:.4f}"
    return line


def model_row(name: str, result: dict) -> str:
    return (
        f"  {name:<8} {result['loss']:>9.4f} {result['accuracy']:>9.4f} {result['tokens_per_s']:>11,.0f} "
        f"{result['parameters']:>12,}  {result['model_dir']}"
    )


def term_rows(result: dict) -> list[str]:
    """The objective's other loss terms (SpanBERT's SBO, ELECTRA's RTD); `loss` above is their sum with the
    masked-token term, whose accuracy (ELECTRA: the generator's) is the table's."""
    names = [key.removeprefix("loss/") for key in result if key.startswith("loss/")]
    rows = [
        f"  {'':<8} {name}: loss {result[f'loss/{name}']:.4f}, accuracy {result[f'{name}_accuracy']:.4f}"
        for name in names
    ]
    if "unit_accuracy" in result:  # ERNIE: entity and phrase units predicted whole
        rows.append(
            f"  {'':<8} units: {result['unit_accuracy']:.4f} of {result['units']} (entities "
            f"{result['entity_unit_accuracy']:.4f}, phrases {result['phrase_unit_accuracy']:.4f})"
        )
    return rows


def comparison(teacher: dict, student: dict | None) -> list[str]:
    t = teacher
    lines = [
        f"Held-out ({t['split']} split, {t['batches']} x {t['batch_size']} sequences of {t['seq_length']}, "
        f"seed {t['seed']}, {t['targets']} targets, CPU with {t['threads']} threads):",
        f"  {'model':<8} {'loss':>9} {'accuracy':>9} {'tokens/s':>11} {'parameters':>12}  directory",
        model_row("teacher", teacher),
        *term_rows(teacher),
    ]
    if student is None:
        return lines
    lines += [model_row("student", student), *term_rows(student)]
    if student["targets"] != teacher["targets"]:
        lines.append(
            "  warning: teacher and student were scored on different targets (batch shape or seed differ)"
        )
    lines.append(
        f"  student vs teacher: {student['tokens_per_s'] / teacher['tokens_per_s']:.2f}x the speed, "
        f"{student['parameters'] / teacher['parameters']:.2f}x the parameters, "
        f"loss {student['loss'] - teacher['loss']:+.4f}, accuracy {student['accuracy'] - teacher['accuracy']:+.4f}"
    )
    return lines


def outputs(runs: dict[str, str | Path], export_dir: str | Path | None, plot: Path | None) -> list[str]:
    lines = ["Outputs:"]
    for name, run in runs.items():
        run_dir = metrics_file(run).parent
        found = [f"{what} {run_dir / what}" for what in RUN_OUTPUTS if (run_dir / what).exists()]
        lines.append(f"  {name}: {run_dir}" + (f" ({', '.join(found)})" if found else ""))
    if export_dir is not None:
        lines.append(f"  Hugging Face export: {export_dir}")
    if plot is not None:
        lines.append(f"  loss curves: {plot}")
    return lines


def report(
    teacher: dict,
    student: dict | None = None,
    runs: dict[str, str | Path] | None = None,
    plot_path: str | Path | None = None,
    export_dir: str | Path | None = None,
) -> str:
    """Draw the loss curves of `runs` (name -> run output dir or metrics.jsonl) to `plot_path`, then print
    and return the text report."""
    runs = runs or {}
    plot = plot_losses(runs, plot_path) if runs and plot_path is not None else None
    lines = ["Training:"] if runs else []
    lines += [f"  {loss_change(name, run)}" for name, run in runs.items()]
    lines += comparison(teacher, student) + outputs(runs, export_dir, plot)
    text = "\n".join(lines)
    print(text)
    return text
