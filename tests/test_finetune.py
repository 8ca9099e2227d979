"""`plmscale finetune`: task files read (and bad rows refused or counted), GLUE's metrics against values
worked out by hand, a tiny encoder that learns a synthetic task well above chance, and exports that
`transformers` loads as *ForSequenceClassification with the same logits."""

from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from test_export_hf import run_config, train_tiny_tokenizer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from data_prep.task import write_package_task
from plmscale.cli import main
from plmscale.config import RunConfig
from plmscale.errors import UserError
from plmscale.finetune.export import export_classifier_hf
from plmscale.finetune.head import SequenceClassifier
from plmscale.finetune.metrics import accuracy, f1, macro_f1, pearson, ranks, spearman
from plmscale.finetune.settings import Settings
from plmscale.finetune.task import load_task
from plmscale.finetune.train import encode_examples, finetune, load_finetuned
from plmscale.model import TransformerLM
from plmscale.model_dir import load_local_model, save_model_dir
from plmscale.tokenizer import CLS_ID, SEP_ID, Tokenizer

# --- metrics -------------------------------------------------------------------------------------------


def test_classification_metrics_match_hand_computed_values():
    predicted = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1])
    target = torch.tensor([0, 1, 2, 2, 2, 0, 0, 0])
    assert accuracy(predicted, target) == 5 / 8
    # class 0: tp 2, predicted 2, actual 4 -> 4/6; class 1: tp 1, 3, 1 -> 2/4; class 2: tp 2, 3, 3 -> 4/6
    assert f1(predicted, target, 0) == pytest.approx(4 / 6)
    assert f1(predicted, target, 1) == pytest.approx(2 / 4)
    assert macro_f1(predicted, target, 3) == pytest.approx((4 / 6 + 2 / 4 + 4 / 6) / 3)
    assert f1(torch.tensor([0, 0]), torch.tensor([0, 0]), 1) == 0.0  # a class never seen nor predicted
    assert macro_f1(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 1]), 2) == pytest.approx(
        (2 * 3 / 7 + 0) / 2
    )  # a majority guesser: F1 6/7 on class 0, 0 on class 1


def test_correlations_match_hand_computed_values():
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-1.5, 0.5, -0.5, 1.5): sum of products 4, sums of squares 5
    assert pearson(x, y) == pytest.approx(4 / 5)
    assert pearson(x, -2 * x + 7) == pytest.approx(-1.0)
    assert pearson(x, torch.ones(4)) == 0.0
    assert ranks(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert spearman(torch.tensor([1.0, 10.0, 100.0, 1000.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == 1.0
    # ranks (1, 4, 2.5, 2.5) against (1, 2, 3, 4): deviations (-1.5, 1.5, 0, 0) and (-1.5, -0.5, 0.5, 1.5),
    # products 1.5, squares 4.5 and 5
    assert spearman(torch.tensor([10.0, 30.0, 20.0, 20.0]), x) == pytest.approx(1.5 / (4.5 * 5) ** 0.5)


# --- task reading -----------------------------------------------------------------------------------


def write_task(directory, train: str, dev: str, ext: str = "tsv", spec: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"train.{ext}").write_text(train)
    (directory / f"dev.{ext}").write_text(dev)
    if spec is not None:
        (directory / "task.json").write_text(json.dumps(spec))
    return directory


def test_reads_tsv_pairs_and_jsonl(tmp_path):
    pair = write_task(
        tmp_path / "pair",
        "id\tsentence1\tsentence2\tlabel\n1\tA cat.\tA dog.\t10\n2\tOne.\tTwo.\t2\n",
        "id\tsentence1\tsentence2\tlabel\n3\tUp.\tDown.\t2\n",
        spec={"text_a": "sentence1", "text_b": "sentence2"},
    )
    task = load_task(pair)
    assert task.pair and task.labels == ["2", "10"]  # numeric class names in numeric order
    assert [(e.text_a, e.text_b, e.label, e.line) for e in task.examples["train"]] == [
        ("A cat.", "A dog.", "10", 2),
        ("One.", "Two.", "2", 3),
    ]
    rows = [{"text": "fine", "score": 4.5}, {"text": "poor", "score": "1"}]
    jsonl = write_task(
        tmp_path / "jsonl", "".join(json.dumps(r) + "\n" for r in rows), json.dumps(rows[0]) + "\n", "jsonl"
    )
    task = load_task(jsonl, {"kind": "regression", "text_a": "text", "label": "score"})
    assert [e.label for e in task.examples["train"]] == [4.5, 1.0] and task.labels is None
    cola = write_task(tmp_path / "cola", "src\t1\t\tGood one.\nsrc\t0\t*\tBad one one.\n", "src\t1\t\tYes.\n")
    task = load_task(cola, {"header": False, "text_a": "3", "label": "1"})  # CoLA: no header row
    assert [(e.text_a, e.label) for e in task.examples["train"]] == [
        ("Good one.", "1"),
        ("Bad one one.", "0"),
    ]


BAD_TRAIN = (
    "sentence\tlabel\n"
    "fine\tpos\n"
    "a\ttab\tinside\tneg\n"  # line 3: four fields
    "\tneg\n"  # line 4: empty text
    "good\tpos\n"
    "bad\tneg\n"
    "worse\t\n"  # line 7: empty label
)


def test_bad_rows_are_an_error_naming_file_and_line_or_counted(tmp_path, capsys):
    task_dir = write_task(tmp_path / "t", BAD_TRAIN, "sentence\tlabel\nok\tneutral\nyes\tpos\n")
    with pytest.raises(
        UserError, match=r"train\.tsv:3: wrong number of fields \(4 fields, the header has 2\)$"
    ):
        load_task(task_dir)
    task = load_task(task_dir, strict=False)
    assert [e.text_a for e in task.examples["train"]] == ["fine", "good", "bad"]
    train, dev = task.rejected["train"].by_reason, task.rejected["dev"].by_reason
    assert {reason: entry["count"] for reason, entry in train.items()} == {
        "wrong number of fields": 1,
        "empty text": 1,
        "empty label": 1,
    }
    assert train["empty text"]["examples"] == [f"{task_dir / 'train.tsv'}:4 (column 'sentence')"]
    assert dev["label not among the task's labels"]["count"] == 1  # "neutral": train has neg and pos
    # the command: one line, exit 2, naming the file and line
    assert main(["finetune", "--model", "m", "--task", str(task_dir), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"plmscale: error: {task_dir / 'train.tsv'}:3: wrong number of fields (4 fields, the header has 2)"
    ]


@pytest.mark.parametrize(
    ("files", "spec", "message"),
    [
        ({"train.tsv": "x\n"}, None, "has no dev.tsv or dev.jsonl"),
        ({"train.tsv": "x\n", "dev.tsv": "", "dev.jsonl": ""}, None, "has both dev.tsv and dev.jsonl"),
        ({"train.tsv": "text\tlabel\na\tb\n", "dev.tsv": ""}, None, r"train\.tsv:1: no column 'sentence'"),
        ({"train.tsv": "", "dev.tsv": ""}, {"kind": "ranking"}, "task.json: kind: Input should be"),
        ({"train.tsv": "sentence\tlabel\na\tx\n", "dev.tsv": ""}, None, "needs 2 or more labels"),
        ({"train.jsonl": '{"sentence": 1, "label": "a"}\n', "dev.jsonl": ""}, None, "text is not a string"),
        ({"train.tsv": "sentence\tlabel\na\thigh\n", "dev.tsv": ""}, {"kind": "regression"}, "not a number"),
    ],
)
def test_task_mistakes_are_one_line(tmp_path, files, spec, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if spec:
        (tmp_path / "task.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=message):
        load_task(tmp_path)


def test_pair_encoding_is_berts(tmp_path):
    tokenizer = Tokenizer(train_tiny_tokenizer(tmp_path))
    task_dir = write_task(
        tmp_path / "t",
        "sentence\tother\tlabel\nthe file\tthe value of the argument\t1\n",
        "sentence\tother\tlabel\nfile\tvalue\t1\n",
    )
    task = load_task(task_dir, {"text_b": "other", "labels": ["0", "1"]})
    a, b = tokenizer.encode(["the file", "the value of the argument"])
    full = encode_examples(tokenizer, task.examples["train"], 64)
    assert full.input_ids[0] == [CLS_ID, *a, SEP_ID, *b, SEP_ID] and full.truncated == 0
    assert full.token_type_ids[0] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    cut = encode_examples(tokenizer, task.examples["train"], len(a) + 5)  # room for 2 of b's tokens
    assert cut.input_ids[0] == [CLS_ID, *a, SEP_ID, *b[:2], SEP_ID] and cut.truncated == 1


# --- fine-tuning ------------------------------------------------------------------------------------

FILLER = [
    "the",
    "a",
    "of",
    "to",
    "is",
    "in",
    "and",
    "for",
    "with",
    "this",
    "that",
    "an",
    "on",
    "as",
    "by",
    "be",
    "it",
    "or",
]
KEYWORDS = {
    "files": ["file", "open", "read", "write", "path", "directory"],
    "numbers": ["number", "value", "integer", "float", "sum", "count"],
}


def synthetic_rows(count: int, seed: int) -> list[tuple[str, str, int]]:
    """Filler words around 1-3 keywords of one class: (text, class, score), the score the number of keywords,
    negative for "files"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(sorted(KEYWORDS))
        words = rng.choices(FILLER, k=rng.randint(4, 8))
        hits = rng.randint(1, 3)
        for word in rng.choices(KEYWORDS[label], k=hits):
            words.insert(rng.randrange(len(words) + 1), word)
        rows.append((" ".join(words), label, hits if label == "numbers" else -hits))
    return rows


def tiny_encoder_dir(directory, tokenizer: str, **model) -> str:
    """A randomly initialized 2-layer encoder (no pre-training: the task must be learned in fine-tuning)."""
    raw = run_config("encoder", Tokenizer(tokenizer).vocab_size).model_dump()
    raw["model"] |= {"init_std": 0.02, "layernorm_eps": 1e-5} | model
    config = RunConfig.model_validate(raw)
    torch.manual_seed(0)
    return save_model_dir(directory, TransformerLM(config.model).state_dict(), config, tokenizer, {"step": 0})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = train_tiny_tokenizer(root)
    model_dir = tiny_encoder_dir(root / "model", tokenizer)
    train, dev = (
        "sentence\tlabel\tscore\n" + "".join(f"{t}\t{c}\t{h}\n" for t, c, h in synthetic_rows(count, seed))
        for count, seed in ((256, 0), (128, 1))
    )
    return root, model_dir, write_task(root / "task", train, dev)


SETTINGS = Settings(epochs=4, batch_size=16, lr=2e-3, max_seq_length=32, seed=3)


def test_finetuning_learns_a_synthetic_task_deterministically(tiny):
    root, model_dir, task_dir = tiny
    task = load_task(task_dir)
    results = finetune(model_dir, task, SETTINGS, root / "ft", device=torch.device("cpu"), log=lambda _: None)
    assert results["majority_accuracy"] == pytest.approx(0.5, abs=0.1)
    assert results["dev"]["accuracy"] >= 0.9 and results["dev"]["macro_f1"] >= 0.9
    assert results["epochs"][-1]["train_loss"] < 0.5 * results["epochs"][0]["train_loss"]
    again = finetune(model_dir, task, SETTINGS, root / "ft2", device=torch.device("cpu"), log=lambda _: None)
    assert again["epochs"] == results["epochs"]  # same seed, same numbers
    model, saved = load_finetuned(root / "ft")  # the written directory scores what training reported
    assert saved["dev"] == results["dev"]
    regression = load_task(task_dir, {"kind": "regression", "label": "score"})
    scores = finetune(
        model_dir, regression, SETTINGS, root / "reg", device=torch.device("cpu"), log=lambda _: None
    )
    assert scores["dev"]["pearson"] >= 0.8 and scores["dev"]["spearman"] >= 0.8


def test_cli_fine_tunes_two_models_into_one_table_and_exports(tiny, capsys):
    root, model_dir, task_dir = tiny
    status = main(
        ["finetune", "--model", f"a={model_dir}", f"b={model_dir}", "--task", str(task_dir), "--output",
         str(root / "cli"), "--export", str(root / "cli_hf"), "--epochs", "1", "--max-seq-length", "32",
         "--threads", "1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    table = out[out.index("model  ") :].splitlines()
    a, b = (json.loads((root / "cli" / name / "finetune.json").read_text())["dev"] for name in "ab")
    assert a == b  # the same model, seed and data
    assert table[1].split()[:3] == ["a", f"{a['loss']:.4f}", f"{a['accuracy']:.4f}"]
    assert table[2].split()[-1] == "100.0%" and table[3].startswith("majority class")
    assert (root / "cli_hf" / "b" / "model.safetensors").is_file()


def test_every_model_is_checked_before_any_trains(tiny, tmp_path, capsys):
    _, model_dir, task_dir = tiny
    missing = tmp_path / "missing"
    argv = ["finetune", "--model", f"a={model_dir}", f"b={missing}", "--task", str(task_dir)]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"plmscale: error: {missing} is not a plmscale model directory (no config.yaml)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_trunk_pre_trained_with_nsp_hands_its_pooler_to_the_head(tiny, tmp_path):
    root, _, _ = tiny
    model_dir = tiny_encoder_dir(tmp_path / "model", str(root / "tokenizer.model"), pair_head=True)
    trunk, _ = load_local_model(model_dir)
    head = SequenceClassifier(trunk, 3, dropout=0.1).head
    assert torch.equal(head.pooler.weight, trunk.pair_head.pooler.weight)
    assert head.classifier.weight.shape == (3, trunk.cfg.hidden_size)


# --- export -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ({}, "classification"),  # pre-LN: Megatron-BERT
        (
            {"layernorm_position": "post", "embedding_layernorm": True, "pair_head": True},
            "regression",
        ),  # BERT
    ],
)
def test_export_is_a_transformers_sequence_classifier_with_the_same_logits(tiny, tmp_path, model, kind):
    root, _, task_dir = tiny
    model_dir = tiny_encoder_dir(tmp_path / "model", str(root / "tokenizer.model"), **model)
    columns = {"kind": kind, "label": "score" if kind == "regression" else None}
    settings = Settings(epochs=1, batch_size=64, max_seq_length=32)
    finetune(
        model_dir,
        load_task(task_dir, columns),
        settings,
        tmp_path / "ft",
        torch.device("cpu"),
        log=lambda _: None,
    )
    out = export_classifier_hf(tmp_path / "ft", tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    family = "Bert" if model else "MegatronBert"
    assert type(hf).__name__ == f"{family}ForSequenceClassification"
    if kind == "regression":
        assert hf.config.num_labels == 1 and hf.config.problem_type == "regression"
    else:
        assert hf.config.id2label == {0: "files", 1: "numbers"}
    ours, _ = load_finetuned(tmp_path / "ft")
    texts = [row[0] for row in synthetic_rows(4, 9)]
    batch = AutoTokenizer.from_pretrained(out)(texts[:2], texts[2:], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        assert torch.allclose(hf(**batch).logits, expected, atol=1e-5)


# --- the corpus task --------------------------------------------------------------------------------


def test_package_task_is_balanced_disjoint_and_deterministic(tmp_path):
    docs = [
        {
            "source": f"{package}.f{i}",
            "text": f"Paragraph doc{i} about {package} and its many parts.\n\n"
            f"More doc{i} on {package}, and its other parts.",
        }
        for package in ("email", "json", "xml", "http")
        for i in range({"email": 30, "json": 12, "xml": 20, "http": 5}[package])
    ] + [{"source": "_private.x", "text": "A private module's docstring, never a class."}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    result = write_package_task(corpus, tmp_path / "t1", packages=3, dev_fraction=0.3)
    assert result["labels"] == ["email", "json", "xml"]  # the three largest, sorted; never _private
    task = load_task(tmp_path / "t1")
    for split in ("train", "dev"):
        labels = [e.label for e in task.examples[split]]
        assert len({labels.count(name) for name in result["labels"]}) == 1  # balanced
    docs_of = {
        split: {e.text_a.split()[1] + e.label for e in task.examples[split]} for split in ("train", "dev")
    }
    assert not docs_of["train"] & docs_of["dev"]  # no docstring's paragraphs on both sides
    write_package_task(corpus, tmp_path / "t2", packages=3, dev_fraction=0.3)
    for name in ("train.tsv", "dev.tsv", "task.json"):
        assert (tmp_path / "t1" / name).read_bytes() == (tmp_path / "t2" / name).read_bytes()
