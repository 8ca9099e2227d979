"""Held-out scores that need instances: ERNIE's unit accuracy (an entity or phrase counts only if every one of
its tokens is right) and the NSP / SOP heads' pair accuracy on instances built from the valid split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_recipe, write_recipe

from data_prep import UserError
from data_prep.cli import main as prep_main
from data_prep.instances.build import build_instances
from data_prep.phrases import PhraseTable
from plmscale.config import ConfigError, RunConfig
from plmscale.data.instances import InstanceSet
from plmscale.data.masking import ERNIE_LEVELS
from plmscale.eval.evaluate import evaluate, unit_counts, unit_metrics
from plmscale.model import TransformerLM
from plmscale.model_dir import load_local_model, save_model_dir
from plmscale.preflight import check_launch
from plmscale.tokenizer import Tokenizer

ENTITIES = "Python\nUnicode\nASCII\nValueError\nTypeError\nUTF-8\nWindows\nPOSIX\n"


def test_a_unit_with_one_wrong_token_is_wrong():
    # one sequence of 10 positions: phrase 1 at 1-3 all right, entity 2 at 4-6 with position 5 wrong,
    # entity 3 at 8-9 all right; position 7 (a basic unit, 0) is wrong and counts for no unit
    hit = torch.tensor([[1, 1, 1, 1, 1, 0, 1, 0, 1, 1]], dtype=torch.bool)
    unit_ids = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 0, 3, 3]])
    phrase, entity = ERNIE_LEVELS.index("phrase"), ERNIE_LEVELS.index("entity")
    unit_levels = torch.tensor([[0, phrase, phrase, phrase, entity, entity, entity, 0, entity, entity]])
    # a second sequence reuses unit number 1: units are told apart per sequence
    hit = torch.cat([hit, torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)])
    unit_ids = torch.cat([unit_ids, torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0, 0, 0]])])
    unit_levels = torch.cat([unit_levels, torch.tensor([[0, phrase, phrase, 0, 0, 0, 0, 0, 0, 0]])])
    metrics = unit_metrics(unit_counts(hit, unit_ids, unit_levels))
    assert metrics["units"] == 4 and metrics["unit_accuracy"] == pytest.approx(2 / 4)
    assert metrics["entity_units"] == 2 and metrics["entity_unit_accuracy"] == pytest.approx(1 / 2)
    assert metrics["phrase_units"] == 2 and metrics["phrase_unit_accuracy"] == pytest.approx(1 / 2)


def model_dir(shards, directory, **model):
    """A random tiny encoder saved with the shards' tokenizer, as training would leave it."""
    objective = {"name": "mlm_nsp"} if model.get("pair_head") else {"name": "mlm"}
    cfg = RunConfig.model_validate(tiny_recipe(shards, directory / "run", model=model, objective=objective))
    torch.manual_seed(0)
    state = TransformerLM(cfg.model).state_dict()
    return save_model_dir(directory, state, cfg, shards.parent / "tokenizer" / "tokenizer.model", {"step": 0})


@pytest.fixture(scope="module")
def ernie_valid(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("ernie")
    (root / "entities.txt").write_text(ENTITIES)
    params = {"entities": str(root / "entities.txt"), "max_seq_length": 64, "mask_prob": 0.3}
    manifest = build_instances(shards, "ernie", root / "valid", params=params, split="valid", progress=False)
    return root, manifest


def test_ernie_instances_record_each_units_level(shards, ernie_valid):
    root, manifest = ernie_valid
    assert manifest["split"] == "valid" and manifest["fields"]["span_levels"] == "uint8"
    tokenizer = Tokenizer(shards.parent / "tokenizer" / "tokenizer.model")
    entities = {tuple(ids) for ids in tokenizer.encode(ENTITIES.split())}
    phrases = set(PhraseTable.load(manifest["params"]["phrases"]).scores)
    instances, seen = InstanceSet(root / "valid"), np.zeros(3, dtype=int)
    for i in range(len(instances)):
        item = instances[i]
        tokens = item["tokens"].astype(np.int64)
        tokens[item["mask_positions"].astype(np.int64)] = item["mask_labels"]
        spans = item["spans"].reshape(-1, 2)
        assert len(item["span_levels"]) == len(spans)
        for (start, end), level in zip(spans.tolist(), item["span_levels"].tolist(), strict=True):
            unit = tuple(tokens[start:end].tolist())
            assert level != ERNIE_LEVELS.index("entity") or unit in entities
            assert level != ERNIE_LEVELS.index("phrase") or unit in phrases
            seen[level] += 1
    assert seen.min() > 0  # basic, phrase and entity units all masked


def test_eval_reports_unit_accuracy_on_ernie_instances(shards, ernie_valid, tmp_path):
    root, _ = ernie_valid
    directory = model_dir(shards, tmp_path / "m")
    result = evaluate(directory, shards, batches=4, batch_size=4, instances_dir=root / "valid")
    assert result["split"] == "instances of valid"
    # by hand, instance by instance: a unit is right when the argmax is the label at each of its positions
    model, _ = load_local_model(directory)
    instances, units, whole, tokens_right, tokens = InstanceSet(root / "valid"), 0, 0, 0, 0
    with torch.inference_mode():
        for i in range(16):
            item = instances[i]
            ids = torch.from_numpy(item["tokens"].astype(np.int64))[None]
            predicted = model(ids, torch.ones_like(ids))[0].argmax(-1).numpy()
            right = np.ones(len(ids[0]), dtype=bool)
            positions = item["mask_positions"].astype(np.int64)
            right[positions] = predicted[positions] == item["mask_labels"]
            tokens_right, tokens = tokens_right + int(right[positions].sum()), tokens + len(positions)
            for (start, end), level in zip(item["spans"].reshape(-1, 2), item["span_levels"], strict=True):
                units, whole = units + (level > 0), whole + (level > 0 and right[start:end].all())
    assert result["targets"] == tokens and result["accuracy"] == pytest.approx(tokens_right / tokens)
    assert result["units"] == result["entity_units"] + result["phrase_units"] == units > 0
    assert result["unit_accuracy"] == pytest.approx(whole / units)


@pytest.fixture(scope="module")
def nsp_valid(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("nsp") / "valid"
    build_instances(shards, "nsp", out, params={"max_seq_length": 64}, split="valid", progress=False)
    return out


def test_pair_accuracy_from_valid_split_instances(shards, nsp_valid, tmp_path):
    out = nsp_valid
    directory = model_dir(shards, tmp_path / "m", pair_head=True, type_vocab_size=2)
    result = evaluate(directory, shards, batches=2, batch_size=4, instances_dir=out)
    # by hand: the pair head's argmax on each of the first 8 instances, unpadded
    model, _ = load_local_model(directory)
    instances, right = InstanceSet(out), 0
    with torch.inference_mode():
        for i in range(8):
            item = instances[i]
            ids = torch.from_numpy(item["tokens"].astype(np.int64))[None]
            segments = torch.from_numpy(item["segments"].astype(np.int64))[None]
            _, pair_logits = model(ids, torch.ones_like(ids), token_type_ids=segments, classify_pair=True)
            right += int(pair_logits.argmax(-1).item() == int(item["pair_label"][0]))
    assert result["loss/pair"] > 0 and result["pair_accuracy"] == pytest.approx(right / 8)
    with pytest.raises(UserError, match="train split"):  # training instances are no held-out score
        train = tmp_path / "nsp_train"
        build_instances(shards, "nsp", train, params={"max_seq_length": 64}, progress=False)
        evaluate(directory, shards, instances_dir=train)


def test_ernie_needs_an_existing_nonempty_entity_list(shards, tmp_path, capsys):
    args = [
        "prep",
        "instances",
        "--shards",
        str(shards),
        "--objective",
        "ernie",
        "--out",
        str(tmp_path / "o"),
    ]
    for entities, message in ((tmp_path / "nope.txt", "no such file"), (tmp_path / "empty.txt", "no entity")):
        (tmp_path / "empty.txt").write_text("\n\n")
        with pytest.raises(SystemExit) as exit_info:
            prep_main([*args, "--entities", str(entities), "--no-progress"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert f"--entities {entities}: " in error and message in error and "\n" not in error


def test_training_eval_instances_are_checked_before_launch(shards, nsp_valid, tmp_path):
    def load(instances):
        recipe = tiny_recipe(shards, tmp_path / "run", model={"pair_head": True}, objective={"name": "mlm_sop"},
                             data={"eval_instances": str(instances)})  # fmt: skip
        return check_launch(write_recipe(tmp_path / "recipe.yaml", recipe), world_size=2)

    with pytest.raises(ConfigError, match="data.eval_instances=.* holds 'nsp' instances, .* on 'sop' ones"):
        load(nsp_valid)
    with pytest.raises(ConfigError, match="data.eval_instances=.*nope: no such directory"):
        load(tmp_path / "nope")
