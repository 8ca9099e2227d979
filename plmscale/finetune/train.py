"""Fine-tune a pre-trained encoder on a task and score it on the dev split, in one process.

Downstream tasks are small (thousands of examples, minutes on a CPU), so a plain loop on one device serves
them: AdamW without decay on biases and LayerNorms, linear warm-up then linear decay to zero (BERT's
recipe), gradient clipping, a fixed seed for the head's initialization, dropout and the shuffling, so a run
gives the same numbers again. The device is DeepSpeed's accelerator (the GPU, or the CPU under
`DS_ACCELERATOR=cpu`), as for pre-training.

The output directory is a model directory (the fine-tuned trunk; its MLM head as pre-trained) with the
task head beside it:

    model.safetensors config.yaml tokenizer.model meta.json   the trunk (plmscale.model_dir)
    classifier.safetensors                                     the pooler and classifier
    finetune.json                                              task, labels, settings, dev scores per epoch
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from plmscale.errors import UserError
from plmscale.finetune.head import SequenceClassifier, TaskKind, task_kind
from plmscale.finetune.settings import DistillSettings, Settings
from plmscale.finetune.task import Example, Task, file_digest
from plmscale.model_dir import TOKENIZER, load_local_model, load_run_config, save_model_dir
from plmscale.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer

HEAD_WEIGHTS, RESULTS = "classifier.safetensors", "finetune.json"


@dataclass(frozen=True)
class Features:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list
    truncated: int  # examples cut to max_seq_length


def encode_examples(tokenizer: Tokenizer, examples: list[Example], max_length: int) -> Features:
    """BERT's inputs: [CLS] a [SEP] (segment 0) b [SEP] (segment 1); a pair too long loses tokens from the
    end of its longer text, one at a time (BERT's `_truncate_seq_pair`)."""
    a_ids = tokenizer.encode([e.text_a for e in examples])
    pair = examples[0].text_b is not None
    b_ids = tokenizer.encode([e.text_b for e in examples]) if pair else [[] for _ in examples]
    budget = max_length - (3 if pair else 2)
    input_ids, token_types, truncated = [], [], 0
    for a, b in zip(a_ids, b_ids, strict=True):
        if len(a) + len(b) > budget:
            truncated += 1
            a, b = list(a), list(b)
            while len(a) + len(b) > budget:
                (a if len(a) >= len(b) else b).pop()
        ids = [CLS_ID, *a, SEP_ID] + ([*b, SEP_ID] if pair else [])
        input_ids.append(ids)
        token_types.append([0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2))
    return Features(input_ids, token_types, [e.label for e in examples], truncated)


def batch_tensors(features: Features, rows: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The rows padded to the longest of them."""
    width = max(len(features.input_ids[r]) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID)
    token_types = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(features.input_ids[r])
        input_ids[i, :n] = torch.tensor(features.input_ids[r])
        token_types[i, :n] = torch.tensor(features.token_type_ids[r])
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": (input_ids != PAD_ID).long().to(device),
        "token_type_ids": token_types.to(device),
    }


def default_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@torch.no_grad()
def evaluate(
    model: SequenceClassifier, features: Features, kind: TaskKind, batch_size: int, device=None
) -> dict:
    model.eval()
    device = device or next(model.parameters()).device
    targets = kind.targets(features.labels)
    predictions, loss_sum = [], 0.0
    for start in range(0, len(targets), batch_size):
        rows = list(range(start, min(start + batch_size, len(targets))))
        logits = model(**batch_tensors(features, rows, device)).cpu()
        loss_sum += kind.loss(logits, targets[rows])[0].item()
        predictions.append(kind.predictions(logits))
    return {"loss": loss_sum / len(targets)} | kind.scores(torch.cat(predictions), targets)


def _optimizer(params: list[torch.nn.Parameter], settings: Settings) -> torch.optim.AdamW:
    """Weight decay on the matrices only: biases and LayerNorm gains are not decayed (BERT)."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr)


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The LR factor of step `step` (0-based): up linearly over the warm-up, then down linearly to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def check_model_dir(model_dir: str | Path, task: Task):
    """The run config of a model directory that can be fine-tuned on `task`, or a UserError naming it."""
    model_dir = Path(model_dir)
    run_config = load_run_config(model_dir)
    if not (model_dir / TOKENIZER).is_file():
        raise UserError(f"{model_dir}: no {TOKENIZER}; fine-tuning tokenizes with the model's tokenizer")
    if run_config.model.kind != "encoder":
        raise UserError(
            f"{model_dir}: fine-tuning needs an encoder (BERT family), not a {run_config.model.kind}"
        )
    if task.pair and run_config.model.type_vocab_size < 2:
        raise UserError(
            f"{model_dir}: a sentence-pair task needs model.type_vocab_size >= 2 (segments A and B)"
        )
    return run_config


def finetune(
    model_dir: str | Path,
    task: Task,
    settings: Settings,
    output_dir: str | Path,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
    distill: DistillSettings | None = None,
) -> dict:
    """Train the directory's encoder with a new head on `task`, from its labels or, with `distill`, from a
    fine-tuned teacher (plmscale.finetune.distill); write `output_dir`; return the results."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    run_config = check_model_dir(model_dir, task)
    start, start_cpu = time.perf_counter(), time.process_time()
    device = device or default_device()
    torch.manual_seed(settings.seed)
    trunk, cfg = load_local_model(model_dir)
    kind = task_kind(task.spec.kind, task.labels)
    model = SequenceClassifier(trunk, kind.num_outputs, settings.dropout).to(device)
    max_length = min(settings.max_seq_length, cfg.max_position_embeddings)
    distiller = None
    if distill:
        from plmscale.finetune.distill import TaskDistillation

        teacher, teacher_results = load_finetuned(distill.teacher)
        max_length = min(max_length, teacher.trunk.cfg.max_position_embeddings)
        distiller = TaskDistillation(distill, teacher.to(device), cfg, kind, settings.epochs)
        distiller.trainable.to(device)
    tokenizer = Tokenizer(model_dir / TOKENIZER)
    features = {
        split: encode_examples(tokenizer, task.examples[split], max_length) for split in task.examples
    }
    train = features["train"]
    targets = kind.targets(train.labels)
    steps_per_epoch = math.ceil(len(targets) / settings.batch_size)
    phases = distiller.phases if distiller else [None]
    history = []
    for phase in phases:
        epochs = phase.epochs if phase else settings.epochs
        params = [p for _, p in model.trained_parameters()]
        optimizer = _optimizer(
            params + (list(distiller.trainable.parameters()) if distiller else []), settings
        )
        total_steps = epochs * steps_per_epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_schedule(total_steps, round(settings.warmup_fraction * total_steps))
        )
        for epoch in range(epochs):
            model.train()
            seed = settings.seed + len(history)
            order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
            loss_sum = 0.0
            label = f"{phase.name + ' ' if phase else ''}epoch {epoch + 1}/{epochs}"
            bar = tqdm(range(steps_per_epoch), desc=label, unit="step", leave=False)
            for step in bar:
                rows = order[step * settings.batch_size : (step + 1) * settings.batch_size].tolist()
                batch, batch_targets = batch_tensors(train, rows, device), targets[rows].to(device)
                if distiller:
                    loss = distiller(model, batch, batch_targets, phase)
                else:
                    loss_sum_batch, count = kind.loss(model(**batch), batch_targets)
                    loss = loss_sum_batch / count
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.item() * len(rows)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.close()
            dev = evaluate(model, features["dev"], kind, settings.batch_size)
            history.append({"epoch": len(history) + 1, "train_loss": loss_sum / len(targets), "dev": dev})
            if phase:
                history[-1]["phase"] = phase.name
            shown = ", ".join(f"{k} {v:.4f}" for k, v in dev.items())
            log(f"{label}: train loss {loss_sum / len(targets):.4f}, dev {shown}")
    results = {
        "model": str(model_dir),
        "task": task.spec.model_dump()
        | {
            "labels": task.labels,
            "files": {k: str(v) for k, v in task.files.items()},
            "sha256": {k: file_digest(v) for k, v in task.files.items()},
        },
        "settings": asdict(settings) | {"max_seq_length": max_length},
        "examples": {split: len(f.labels) for split, f in features.items()},
        "truncated": {split: f.truncated for split, f in features.items()},
        "rejected": {split: r.by_reason for split, r in task.rejected.items()},
        "majority_accuracy": majority_accuracy(task) if task.labels else None,
        "epochs": history,
        "dev": history[-1]["dev"],
        "device": str(device),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - start_cpu,  # all threads of this process
    }
    if distill:
        results["distill"] = asdict(distill) | {"teacher_dev": teacher_results["dev"]}
    save_finetuned(model, run_config, model_dir / TOKENIZER, results, output_dir)
    return results


def majority_accuracy(task: Task) -> float:
    """Dev accuracy of always answering train's most frequent class: the floor a classifier must beat."""
    train_labels = [e.label for e in task.examples["train"]]
    majority = max(task.labels, key=train_labels.count)
    return sum(e.label == majority for e in task.examples["dev"]) / len(task.examples["dev"])


def save_finetuned(model: SequenceClassifier, run_config, tokenizer: Path, results: dict, out: Path) -> None:
    trunk_state = {k: v.detach().cpu() for k, v in model.trunk.state_dict().items()}
    meta = {"finetuned_from": results["model"], "task": results["task"], "dev": results["dev"]}
    save_model_dir(out, trunk_state, run_config, tokenizer, meta)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        str(out / HEAD_WEIGHTS),
    )
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")


def read_results(directory: str | Path) -> dict:
    """A fine-tuned directory's finetune.json: its task, labels, settings and scores."""
    path = Path(directory) / RESULTS
    if not path.is_file():
        raise UserError(
            f"{directory}: not a fine-tuned model directory (no {RESULTS}; see `plmscale finetune`)"
        )
    return json.loads(path.read_text())


def load_finetuned(directory: str | Path) -> tuple[SequenceClassifier, dict]:
    """A fine-tuned directory's classifier in eval mode, and its results (task, labels, settings, scores)."""
    results = read_results(directory)
    trunk, _ = load_local_model(directory)
    kind = task_kind(results["task"]["kind"], results["task"]["labels"])
    model = SequenceClassifier(trunk, kind.num_outputs, results["settings"]["dropout"])
    model.head.load_state_dict(load_file(str(Path(directory) / HEAD_WEIGHTS)))
    return model.eval(), results
