"""Task distillation (`plmscale finetune --teacher`, TinyBERT's second stage): the weighted losses against
values computed by hand from the two classifiers, a narrow student that learns a synthetic task from its
fine-tuned teacher, and the teacher mistakes refused in one line before anything trains."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_export_hf import train_tiny_tokenizer
from test_finetune import synthetic_rows, tiny_encoder_dir, write_task

from plmscale.cli import main
from plmscale.distill.losses import Attention, Embedding, Hidden, Logits
from plmscale.finetune.distill import TaskDistillation, parse_losses
from plmscale.finetune.head import SequenceClassifier, task_kind
from plmscale.finetune.settings import DistillSettings, Settings
from plmscale.finetune.task import load_task
from plmscale.finetune.train import finetune
from plmscale.model import Capture
from plmscale.model_dir import load_local_model

CPU = torch.device("cpu")
QUIET = {"device": CPU, "log": lambda _: None}
SETTINGS = Settings(epochs=4, batch_size=16, lr=2e-3, max_seq_length=32, seed=3)
NARROW = {"hidden_size": 16, "ffn_hidden_size": 32}  # the teacher is 2 x 32 with 4 heads: 4 heads of 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a synthetic two-class task, a teacher fine-tuned on it, a narrow random student."""
    root = tmp_path_factory.mktemp("task_distill")
    tokenizer = train_tiny_tokenizer(root)
    rows = {split: synthetic_rows(count, seed) for split, count, seed in (("train", 256, 0), ("dev", 128, 1))}
    train, dev = (
        "sentence\tlabel\tscore\n" + "".join(f"{t}\t{c}\t{h}\n" for t, c, h in rows[s]) for s in rows
    )
    task_dir = write_task(root / "task", train, dev)
    finetune(
        tiny_encoder_dir(root / "teacher", tokenizer), load_task(task_dir), SETTINGS, root / "ft", **QUIET
    )
    student = tiny_encoder_dir(root / "student", tokenizer, **NARROW)
    return root, task_dir, student


def classifier(directory, outputs: int, seed: int) -> SequenceClassifier:
    torch.manual_seed(seed)
    trunk, _ = load_local_model(directory)
    return SequenceClassifier(trunk, outputs, dropout=0.0)


def scores(capture: Capture, layer: int, heads: int) -> torch.Tensor:
    q, k, _ = capture.qkv[layer]
    return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [batch, heads, seq, seq]


def test_task_losses_match_hand_computed_values(setup):
    root, _, student_dir = setup
    kind = task_kind("classification", ["files", "numbers"])
    teacher, student = classifier(root / "ft", 2, 1), classifier(student_dir, 2, 2)
    losses = parse_losses(
        "[{name: logits, temperature: 2.0, weight: 0.7}, {name: hard, weight: 0.3}, {name: embedding, "
        "weight: 0.1}, {name: hidden, weight: 0.5}, {name: attention, weight: 0.2}]"
    )
    distill = TaskDistillation(
        DistillSettings(str(root / "ft"), losses, intermediate_epochs=0), teacher, student.trunk.cfg, kind, 1
    )
    assert [type(loss) for _, loss in distill.losses.values()] == [Logits, type(distill.losses["hard"][1]),
                                                                  Embedding, Hidden, Attention]  # fmt: skip
    # two examples, the second padded: 5 and 3 real tokens
    input_ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 3, 0, 0]])
    mask = (input_ids != 0).long()
    batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}
    labels = torch.tensor([1, 0])
    total = distill(student, batch, labels, distill.phases[0])

    seen = {name: Capture(hidden=True, attention_layers={0, 1}) for name in ("s", "t")}
    s_logits, t_logits = student(**batch, capture=seen["s"]), teacher(**batch, capture=seen["t"])
    t = 2.0
    p_t, log_p_s = F.softmax(t_logits / t, -1), F.log_softmax(s_logits / t, -1)
    soft_ce = -(p_t * log_p_s).sum(-1)  # TinyBERT's soft cross-entropy, per example
    entropy = -(p_t * p_t.log()).sum(-1)  # the KL is it less the teacher's entropy: the same gradients
    soft = t * t * (soft_ce - entropy).sum() / 2
    hard = F.cross_entropy(s_logits, labels)
    real = mask.bool()
    project = distill.losses["hidden"][1].project  # 16 -> 32, learned with the student
    embedding = ((project(seen["s"].hidden_states[0]) - seen["t"].hidden_states[0]) ** 2).mean(-1)[real].sum()
    hidden = sum(  # uniform map, 2 -> 2 layers: layer i from layer i (hidden_states[i + 1])
        ((project(seen["s"].hidden_states[i + 1]) - seen["t"].hidden_states[i + 1]) ** 2).mean(-1)[real].sum()
        for i in range(2)
    )
    keys = real[:, None, None, :]  # each query's error averaged over the keys it attends to
    attention = sum(
        (((scores(seen["s"], i, 4) - scores(seen["t"], i, 4)) ** 2 * keys).sum(-1) / keys.sum(-1))
        .mean(1)[real]
        .sum()
        for i in range(2)
    )
    tokens = real.sum()
    expected = 0.7 * soft + 0.3 * hard + (0.1 * embedding + 0.5 * hidden + 0.2 * attention) / tokens
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert distill.losses["embedding"][1].project is not project  # each loss its own projection

    regression = TaskDistillation(
        DistillSettings(str(root / "ft"), ({"name": "logits", "weight": 1.0},)),
        classifier(root / "ft", 1, 1),
        student.trunk.cfg,
        task_kind("regression", None),
        1,
    )
    narrow = classifier(student_dir, 1, 2)
    loss = regression(narrow, batch, torch.tensor([0.5, -1.0]), regression.phases[0])
    with torch.no_grad():  # the squared error to the teacher's prediction, not to the labels
        squared = ((narrow(**batch) - regression.teacher(**batch)) ** 2).sum() / 2
    assert loss.item() == pytest.approx(squared.item(), rel=1e-5)


def test_a_narrow_student_learns_the_task_from_its_teacher(setup, capsys):
    root, task_dir, student = setup
    teacher_dev = json.loads((root / "ft" / "finetune.json").read_text())["dev"]
    assert teacher_dev["accuracy"] >= 0.9
    argv = [
        "finetune",
        "--model",
        f"narrow={student}",
        "--task",
        str(task_dir),
        "--teacher",
        str(root / "ft"),
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "5e-3",
        "--max-seq-length",
        "32",
        "--seed",
        "3",
        "--threads",
        "1",
    ]  # fmt: skip; a narrow student wants a higher learning rate than its teacher
    assert main([*argv, "--output", str(root / "kd")]) == 0
    out = capsys.readouterr().out
    results = json.loads((root / "kd" / "finetune.json").read_text())
    assert (
        results["distill"]["teacher"] == str(root / "ft") and results["distill"]["teacher_dev"] == teacher_dev
    )
    assert [e["name"] for e in results["distill"]["losses"]] == ["embedding", "hidden", "attention", "logits"]
    # TinyBERT's order by default: the intermediate layers alone, then the predictions alone
    assert [e["phase"] for e in results["epochs"]] == ["intermediate"] * 3 + ["prediction"] * 3
    assert results["dev"]["accuracy"] >= 0.9  # chance is 0.5; the teacher's level
    table = out[out.index("model  ") :].splitlines()
    assert table[1].split()[:3] == ["ft", "(teacher)", f"{teacher_dev['loss']:.4f}"]
    assert table[2].split()[0] == "narrow" and table[2].split()[-1].endswith("%")
    # all losses together
    assert main([*argv, "--intermediate-epochs", "0", "--output", str(root / "kd2")]) == 0
    capsys.readouterr()
    epochs = json.loads((root / "kd2" / "finetune.json").read_text())["epochs"]
    assert [e["phase"] for e in epochs] == ["distillation"] * 3
    assert epochs[-1]["dev"]["accuracy"] >= 0.9


def test_teacher_mistakes_are_one_line_before_training(setup, tmp_path, capsys):
    root, task_dir, student = setup
    train, dev = ((task_dir / f"{split}.tsv").read_text() for split in ("train", "dev"))
    other = write_task(
        tmp_path / "other", train.replace("\tfiles\t", "\tdisk\t"), dev.replace("\tfiles\t", "\tdisk\t")
    )
    fewer_rows = write_task(tmp_path / "fewer_rows", "".join(train.splitlines(keepends=True)[:-1]), dev)
    teacher = root / "ft"
    retokenized = shutil.copytree(teacher, tmp_path / "retokenized")
    (retokenized / "tokenizer.model").write_bytes(b"another vocabulary")
    cases = [
        ([f"--teacher={retokenized}"], task_dir, f"{retokenized}/tokenizer.model: the teacher's tokenizer differs"),
        ([f"--teacher={student}"], task_dir, f"{student}: not a fine-tuned model directory (no finetune.json"),
        ([f"--teacher={teacher}"], other, f"{teacher}/finetune.json: the teacher's labels ['files', 'numbers'] "
                                          "differ from the task's ['disk', 'numbers']"),
        ([f"--teacher={teacher}"], fewer_rows, f"{teacher}/finetune.json: the teacher was fine-tuned on "),
        ([f"--teacher={teacher}", "--distill-losses", "[{name: hiden}]"], task_dir, "--distill-losses.0.name: "
                                                                                 "unknown distillation loss"),
        ([f"--teacher={teacher}", "--intermediate-epochs", "1", "--distill-losses", "[{name: hidden}]"],
         task_dir, "but --distill-losses has no prediction-layer loss"),
        (["--intermediate-epochs", "1"], task_dir, "--distill-losses and --intermediate-epochs need --teacher"),
    ]  # fmt: skip
    for extra, task, message in cases:
        out = tmp_path / "out"
        argv = ["finetune", "--model", str(student), "--task", str(task), "--output", str(out), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("plmscale: error: ") and message in err[0], err
        assert not out.exists()
