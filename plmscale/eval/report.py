"""The end-of-pipeline report: loss curves of the training runs, and teacher vs student held-out numbers.

Training runs are read from their `metrics.jsonl` (one JSON object per line, `kind` "train" or "eval",
`step`, `loss`, ...), as written by `plmscale.training.metrics`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from plmscale.eval.evaluate import SPEED_REPEATS, SPEED_SECONDS
from plmscale.inference.fill_mask import FilledText
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


OBJECTIVE_PANEL = "objective loss"


def loss_panels(runs: dict[str, str | Path]) -> dict[str, list[tuple[int, str, str | Path, bool]]]:
    """Panel title -> (run number, name, run, whether its train curve is drawn there). The objective's loss
    panel holds every held-out curve and the train curves of runs that optimize the objective itself; each
    other training loss (distillation, MLM + pair) gets its own panel, not being comparable to it."""
    panels: dict[str, list] = {OBJECTIVE_PANEL: []}
    for number, (name, run) in enumerate(runs.items()):
        label = train_label(run)
        panels[OBJECTIVE_PANEL].append((number, name, run, label == "train"))
        if label != "train":
            title = label.removeprefix("train (").removesuffix(")")
            panels.setdefault(title, []).append((number, name, run, True))
    return panels


def plot_losses(runs: dict[str, str | Path], path: str | Path, baseline_loss: float | None = None) -> Path:
    """One panel per kind of loss (`loss_panels`), one colour per run: train losses as lines, held-out as
    markers, the unigram-frequency baseline as a dotted line on the objective's panel."""
    panels = loss_panels(runs)
    fig = Figure(figsize=(6.5 * len(panels), 4.5), layout="constrained")
    for ax, (label, entries) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels.items(), strict=True
    ):
        for number, name, run, show_train in entries:
            records, color = read_metrics(run), f"C{number}"
            if show_train:
                ax.plot(*curve(records, "train"), color=color, alpha=0.8, label=f"{name} train")
            steps, losses = curve(records, "eval")
            if label == "train" and steps:
                ax.plot(steps, losses, "o--", color=color, label=f"{name} held-out")
        if label == "train" and baseline_loss is not None:
            ax.axhline(
                baseline_loss, color="gray", linestyle=":", label="unigram-frequency baseline (held-out)"
            )
        title = "objective loss" if label == "train" else label.removeprefix("train (").removesuffix(")")
        ax.set(xlabel="optimizer step", ylabel="loss", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def loss_summary(name: str, run: str | Path) -> str:
    """First and last logged losses; whether they mean anything is what the held-out table and its baseline
    say (a loss that falls from its random-init value may still sit at the baseline)."""
    records = read_metrics(run)
    steps, losses = curve(records, "train")
    if not steps:
        return f"{name}: no train loss logged"
    line = f"{name}: {train_label(run)} loss {losses[0]:.4f} (step {steps[0]}) -> {losses[-1]:.4f} (step {steps[-1]})"
    eval_steps, eval_losses = curve(records, "eval")
    if eval_steps:
        line += f"; held-out {eval_losses[0]:.4f} (step {eval_steps[0]}) -> {eval_losses[-1]:.4f} (step {eval_steps[-1]})"
    return line


def model_row(name: str, result: dict) -> str:
    return (
        f"  {name:<9} {result['loss']:>8.4f} {result['accuracy']:>9.4f} {result['parameters']:>12,}  "
        f"{result['model_dir']}"
    )


def term_rows(result: dict) -> list[str]:
    """The objective's other loss terms (SpanBERT's SBO, ELECTRA's RTD); `loss` above is their sum with the
    masked-token term, whose accuracy (ELECTRA: the generator's) is the table's."""
    names = [key.removeprefix("targets/") for key in result if key.startswith("targets/")]
    rows = [
        f"  {'':<8} {name}: loss {result[f'loss/{name}']:.4f}"
        + (f", accuracy {result[f'{name}_accuracy']:.4f}" if f"{name}_accuracy" in result else "")
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
        f"seed {t['seed']}, {t['targets']:,} targets):",
        f"  {'model':<9} {'loss':>8} {'accuracy':>9} {'parameters':>12}  directory",
        f"  {'baseline':<9} {t['baseline_loss']:>8.4f} {t['baseline_accuracy']:>9.4f} {'-':>12}  "
        f"unigram frequencies of {t['baseline_tokens']:,} training tokens, blind to context",
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
        f"  student / teacher: {student['accuracy'] / max(teacher['accuracy'], 1e-12):.1%} of the accuracy, "
        f"loss {student['loss'] - teacher['loss']:+.4f}, {student['parameters'] / teacher['parameters']:.2f}x "
        "the parameters"
    )
    return lines


def speed_row(name: str, result: dict) -> str:
    return f"  {name:<9} {result['batch1_ms']:>13.2f} {result['batch32_tokens_per_s']:>19,.0f}"


def speeds(teacher: dict, student: dict | None) -> list[str]:
    lines = [
        f"CPU inference ({teacher['threads']} threads; forward of the trunk on held-out sequences of "
        f"{teacher['seq_length']}, best pass of {SPEED_SECONDS:g} s, at least {SPEED_REPEATS}):",
        f"  {'model':<9} {'batch 1 (ms)':>13} {'batch 32 (tokens/s)':>19}",
        speed_row("teacher", teacher),
    ]
    if student is not None:
        lines += [
            speed_row("student", student),
            f"  student vs teacher: {teacher['batch1_ms'] / student['batch1_ms']:.2f}x the speed at batch 1, "
            f"{student['batch32_tokens_per_s'] / teacher['batch32_tokens_per_s']:.2f}x at batch 32",
        ]
    return lines


def fill_mask_lines(examples: dict[str, dict[str, FilledText]]) -> list[str]:
    """examples: text -> model name -> its answers."""
    lines = ["Fill-mask on held-out sentences (most probable tokens per [MASK]):"] if examples else []
    for text, answers in examples.items():
        lines.append(f"  {text}")
        for name, filled in answers.items():
            guesses = " | ".join(
                ", ".join(f"{c.token.strip()!r} {c.probability:.2f}" for c in candidates)
                for candidates in filled.candidates
            )
            lines.append(f"    {name:<8} {guesses}")
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
    examples: dict[str, dict[str, FilledText]] | None = None,
) -> str:
    """Draw the loss curves of `runs` (name -> run output dir or metrics.jsonl) to `plot_path`, then print
    and return the text report."""
    runs = runs or {}
    plot = plot_losses(runs, plot_path, teacher["baseline_loss"]) if runs and plot_path is not None else None
    lines = ["Training:"] if runs else []
    lines += [f"  {loss_summary(name, run)}" for name, run in runs.items()]
    lines += comparison(teacher, student) + speeds(teacher, student) + fill_mask_lines(examples or {})
    lines += outputs(runs, export_dir, plot)
    text = "\n".join(lines)
    print(text)
    return text
