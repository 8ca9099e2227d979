"""Distillation: student initialization from teacher layers (deeper, wider teacher), what the model
captures, each loss against a hand-computed reference, config validation, and short runs in which each
kind of loss falls."""

import copy
import math

import pytest
import torch
import yaml
from conftest import REPO

from plmscale.config import ConfigError, DistillConfig, ModelConfig, load_config
from plmscale.distill import Distillation, default_student_layers, student_state_from_teacher
from plmscale.distill.losses import Views, build_loss
from plmscale.distill.losses.base import layer_pairs
from plmscale.distill.student import check_student_config
from plmscale.model import Capture, TransformerLM
from plmscale.objectives import IGNORE_INDEX, get_objective

TEACHER = ModelConfig(kind="encoder", vocab_size=200, hidden_size=32, num_layers=4, num_heads=4,
                      max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
STUDENT = TEACHER.model_copy(update={"num_layers": 2})
DEEP = TEACHER.model_copy(update={"num_layers": 9})  # deeper than its teacher: uniform maps layer 0 to -1
NARROW = TEACHER.model_copy(
    update={"num_layers": 2, "hidden_size": 16, "num_heads": 2, "ffn_hidden_size": 40}
)


def test_default_layers_are_spread_and_end_with_the_last():
    assert default_student_layers(4, 2) == [1, 3]
    assert default_student_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert default_student_layers(12, 4) == [2, 5, 8, 11]


def student_from(teacher: TransformerLM, cfg: ModelConfig, layers: list[int]):
    student = TransformerLM(cfg)
    state, how = student_state_from_teacher(teacher.state_dict(), student.state_dict(), layers, TEACHER, cfg)
    student.load_state_dict(state)  # strict: exactly the student's keys
    return student, how


def test_student_starts_from_the_chosen_teacher_layers():
    torch.manual_seed(0)
    teacher = TransformerLM(TEACHER)
    student, how = student_from(teacher, STUDENT, [1, 3])
    assert how == {"copied": len(student.state_dict())}
    assert torch.equal(student.layers["0"].attn.qkv.weight, teacher.layers["1"].attn.qkv.weight)
    assert torch.equal(student.layers["1"].mlp.fc_out.bias, teacher.layers["3"].mlp.fc_out.bias)
    assert torch.equal(student.word_embeddings.weight, teacher.word_embeddings.weight)
    assert torch.equal(student.head.dense.weight, teacher.head.dense.weight)


def test_narrow_student_is_sliced_by_features_heads_and_neurons():
    torch.manual_seed(0)
    teacher = TransformerLM(TEACHER)
    student, how = student_from(teacher, NARROW, [1, 3])
    assert how["random"] == 0 and how["sliced"] > 0
    assert torch.equal(student.word_embeddings.weight, teacher.word_embeddings.weight[:, :16])
    t_qkv = teacher.layers["3"].attn.qkv.weight.view(4, 3, 8, 32)  # [heads, (q, k, v), head_dim, hidden]
    s_qkv = student.layers["1"].attn.qkv.weight.view(2, 3, 8, 16)
    assert torch.equal(s_qkv, t_qkv[:2, :, :, :16])  # the first two heads, whole, on the first 16 features
    assert torch.equal(student.layers["1"].attn.proj.weight, teacher.layers["3"].attn.proj.weight[:16, :16])
    assert torch.equal(student.layers["0"].mlp.fc_in.weight, teacher.layers["1"].mlp.fc_in.weight[:40, :16])
    assert torch.equal(student.layers["0"].mlp.fc_in.bias, teacher.layers["1"].mlp.fc_in.bias[:40])
    # wider than the teacher somewhere: that tensor keeps its own initialization
    wide = NARROW.model_copy(update={"ffn_hidden_size": 256})
    student, how = student_from(teacher, wide, [1, 3])
    assert how["random"] == 6  # fc_in weight and bias, fc_out weight, in both layers; fc_out.bias is [16]
    assert not torch.equal(
        student.layers["0"].mlp.fc_in.weight[:128, :16], teacher.layers["1"].mlp.fc_in.weight[:, :16]
    )


def test_student_may_differ_in_shape_only():
    check_student_config(TEACHER, STUDENT, [1, 3])
    check_student_config(TEACHER, NARROW, [1, 3])
    with pytest.raises(ValueError, match="model.max_position_embeddings"):
        check_student_config(TEACHER, STUDENT.model_copy(update={"max_position_embeddings": 64}), [1, 3])
    with pytest.raises(ValueError, match="student_layers"):
        check_student_config(TEACHER, STUDENT, [1, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        check_student_config(TEACHER, STUDENT, [1, 4])


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_capture_records_what_the_attention_used(kind):
    """Softmax(q k^T / sqrt(d)) v under the recorded mask, through the output projection, is the layer's
    attention output; the hidden states are the layers' outputs (padding and causal masks)."""
    cfg = TEACHER.model_copy(update={"kind": kind})
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    ids = torch.randint(5, 200, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    for attention_mask in (mask, None):
        capture = Capture(hidden=True, attention_layers=[2])
        logits = model(ids, attention_mask, capture=capture)
        assert torch.equal(logits, model(ids, attention_mask))  # capturing changes nothing
        assert len(capture.hidden_states) == 5 and sorted(capture.qkv) == [2]
        final = model.final_ln(capture.hidden_states[-1])
        assert torch.allclose(final, model.hidden_states(ids, attention_mask), atol=1e-6)
        q, k, v = capture.qkv[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        if capture.attend is not None:
            scores = scores.masked_fill(~capture.attend, float("-inf"))
        else:
            assert kind == "encoder" and attention_mask is None
        heads = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, -1)
        layer = model.layers["2"]
        x = capture.hidden_states[2]
        bias = model.attention_bias(attention_mask, 10) if attention_mask is not None else None
        expected = layer.attn(layer.ln_attn(x), bias, kind == "decoder")
        assert torch.allclose(layer.attn.proj(heads), expected, atol=1e-5)


def test_capture_under_activation_checkpointing_gives_the_same_gradients():
    from plmscale.parallel.checkpointing import checkpoint_layers

    torch.manual_seed(0)
    plain = TransformerLM(TEACHER.model_copy(update={"kind": "decoder"}))
    recomputed = copy.deepcopy(plain)
    assert checkpoint_layers(recomputed, 1) == 4
    ids = torch.randint(5, 200, (2, 8))
    grads = []
    for model in (plain, recomputed):
        capture = Capture(hidden=True, attention_layers={1})
        logits = model(ids, capture=capture)
        loss = logits.pow(2).mean() + capture.qkv[1][0].pow(2).sum() + capture.hidden_states[2].pow(3).mean()
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][name], grads[1][name], atol=1e-6) for name in grads[0])
    assert grads[0]["layers.1.attn.qkv.weight"].abs().sum() > 0


# --- each loss against a reference written out with loops, on tiny random tensors -------------------------

B, S = 2, 5


def random_capture(layers: int, heads: int, head_dim: int, gen) -> Capture:
    capture = Capture(hidden=True, attention_layers=range(layers))
    capture.hidden_states = [torch.randn(B, S, heads * head_dim, generator=gen) for _ in range(layers + 1)]
    capture.qkv = {
        i: tuple(torch.randn(B, heads, S, head_dim, generator=gen) for _ in "qkv") for i in range(layers)
    }
    return capture


def views(student_cfg, teacher_cfg, causal=False, seed=0) -> Views:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.ones(B, S, dtype=torch.bool)
    tokens[1, 3:] = False
    attend = tokens[:, None, None, :] & (torch.ones(S, S, dtype=torch.bool).tril() if causal else True)
    student = random_capture(student_cfg.num_layers, student_cfg.num_heads, student_cfg.head_dim, gen)
    teacher = random_capture(teacher_cfg.num_layers, teacher_cfg.num_heads, teacher_cfg.head_dim, gen)
    student.attend = teacher.attend = attend
    spec = TransformerLM(STUDENT).spec
    return Views({}, None, spec, spec, None, None, student, teacher, tokens)


def keys_of(v: Views, b: int, i: int) -> list[int]:
    return [j for j in range(S) if v.student.attend.expand(B, 1, S, S)[b, 0, i, j]]


def kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(softmax(p) || softmax(q)), written out."""
    p = torch.tensor(p_logits).softmax(0)
    q = torch.tensor(q_logits).softmax(0)
    return float(sum(p[j] * (p[j].log() - q[j].log()) for j in range(len(p))))


def per_query_mean_over_heads(v: Views, heads: int, value) -> float:
    """sum over real query tokens of mean over heads h of value(b, h, i, keys)."""
    total = 0.0
    for b in range(B):
        for i in range(S):
            if v.tokens[b, i]:
                rows = [value(b, h, i, keys_of(v, b, i)) for h in range(heads)]
                total += sum(rows) / len(rows)
    return total


def concat(qkv_part: torch.Tensor) -> torch.Tensor:
    """[B, heads, S, d] -> [B, S, heads * d]."""
    return torch.cat(list(qkv_part.unbind(1)), dim=-1)


def relation_logits(x: torch.Tensor, y: torch.Tensor, b: int, r: int, heads: int, i: int, keys):
    width = x.shape[-1] // heads
    xs, ys = x[b, :, r * width : (r + 1) * width], y[b, :, r * width : (r + 1) * width]
    return [float(xs[i] @ ys[j]) / math.sqrt(width) for j in keys]


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_loss_with_projection_and_uniform_map(metric):
    v = views(NARROW, TEACHER)
    loss = build_loss("hidden", {"metric": metric}, NARROW, TEACHER, "distill.losses.0")
    assert loss.pairs == [(1, 2), (2, 4)]  # layer outputs 0 -> 1, 1 -> 3 (hidden_states[0]: embeddings)
    w, bias = loss.project.weight, loss.project.bias
    expected = 0.0
    for s, t in ((1, 2), (2, 4)):
        for b in range(B):
            for i in range(S):
                if v.tokens[b, i]:
                    x = (w @ v.student.hidden_states[s][b, i] + bias).detach()
                    y = v.teacher.hidden_states[t][b, i]
                    expected += float(
                        ((x - y) ** 2).mean() if metric == "mse" else 1 - x @ y / (x.norm() * y.norm())
                    )
    assert loss(v).item() == pytest.approx(expected, rel=1e-5)
    same_width = build_loss("embedding", {}, STUDENT, TEACHER, "k")
    assert isinstance(same_width.project, torch.nn.Identity)
    v = views(STUDENT, TEACHER)
    difference = v.student.hidden_states[0] - v.teacher.hidden_states[0]
    assert same_width(v).item() == pytest.approx(float(difference.pow(2).mean(-1)[v.tokens].sum()), rel=1e-5)


def scores_of(
    capture: Capture, layer: int, part: tuple[int, int], b: int, h: int, i: int, keys
) -> list[float]:
    """Scaled dot products of head h's query (or value, part=(2, 2)) at i with those at the keys."""
    x, y = capture.qkv[layer][part[0]], capture.qkv[layer][part[1]]
    return [float(x[b, h, i] @ y[b, h, j]) / math.sqrt(x.shape[-1]) for j in keys]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_scores_and_distributions_over_a_layer_map(causal):
    v = views(STUDENT, TEACHER, causal)
    for form in ("scores", "probs"):
        loss = build_loss("attention", {"form": form, "layers": [[0, 2], [1, 3]]}, STUDENT, TEACHER, "k")
        expected = 0.0
        for s, t in ((0, 2), (1, 3)):

            def value(b, h, i, keys, s=s, t=t, form=form):
                a, c = (
                    scores_of(v.student, s, (0, 1), b, h, i, keys),
                    scores_of(v.teacher, t, (0, 1), b, h, i, keys),
                )
                if form == "probs":
                    return kl(c, a)
                return sum((x - y) ** 2 for x, y in zip(a, c, strict=True)) / len(keys)

            expected += per_query_mean_over_heads(v, 4, value)
        assert loss(v).item() == pytest.approx(expected, rel=1e-5)


def test_minilm_v1_attention_and_value_relation():
    v = views(STUDENT, TEACHER, causal=True)
    loss = build_loss("minilm", {"teacher_layer": 2}, STUDENT, TEACHER, "k")

    def value(b, h, i, keys):
        attention = kl(
            scores_of(v.teacher, 2, (0, 1), b, h, i, keys), scores_of(v.student, 1, (0, 1), b, h, i, keys)
        )
        values = kl(
            scores_of(v.teacher, 2, (2, 2), b, h, i, keys), scores_of(v.student, 1, (2, 2), b, h, i, keys)
        )
        return attention + values

    assert loss(v).item() == pytest.approx(per_query_mean_over_heads(v, 4, value), rel=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_minilm_v2_relations_over_relation_heads_with_free_head_counts(causal):
    v = views(NARROW, TEACHER, causal)  # student: 2 heads of 8, width 16; teacher: 4 heads of 8, width 32
    loss = build_loss("minilm_v2", {"relation_heads": 8}, NARROW, TEACHER, "k")
    assert loss.layers == (1, 3)
    expected = 0.0
    for part in range(3):
        a, c = concat(v.student.qkv[1][part]), concat(v.teacher.qkv[3][part])

        def value(b, r, i, keys, a=a, c=c):
            return kl(relation_logits(c, c, b, r, 8, i, keys), relation_logits(a, a, b, r, 8, i, keys))

        expected += per_query_mean_over_heads(v, 8, value)
    assert loss(v).item() == pytest.approx(expected, rel=1e-5)


def test_layer_maps():
    assert layer_pairs("uniform", STUDENT, TEACHER, "k") == [(0, 1), (1, 3)]
    assert layer_pairs("uniform", TEACHER.model_copy(update={"num_layers": 3}),
                       TEACHER.model_copy(update={"num_layers": 12}), "k") == [(0, 3), (1, 7), (2, 11)]  # fmt: skip
    assert layer_pairs("last", STUDENT, TEACHER, "k") == [(1, 3)]
    assert layer_pairs([(0, 0), (1, 2)], STUDENT, TEACHER, "k") == [(0, 0), (1, 2)]


@pytest.mark.parametrize(
    ("name", "params", "student", "message"),
    [
        ("hidden", {"layers": [[0, 1], [2, 3]]}, STUDENT, r"distill.losses.1.layers: pair \[2, 3\] outside"),
        ("attention", {"layers": [[0, 4]]}, STUDENT, r"distill.losses.1.layers: pair \[0, 4\] outside"),
        ("hidden", {}, DEEP, r"distill.losses.1.layers: pair \[0, -1\] outside"),
        ("attention", {}, NARROW, r"distill.losses.1 compares attention head by head: model.num_heads=2"),
        ("minilm", {"teacher_layer": 4}, STUDENT, r"distill.losses.1.teacher_layer=4 outside"),
        ("minilm_v2", {"relation_heads": 3}, STUDENT, r"distill.losses.1.relation_heads=3 must divide"),
        ("minilm_v2", {"relation_heads": 32}, NARROW, r"relation_heads=32 must divide model.hidden_size=16"),
        ("minilm_v2", {}, STUDENT, r"distill.losses.1.relation_heads: Field required"),
        ("hidden", {"metric": "l1"}, STUDENT, r"distill.losses.1.metric: Input should be 'mse' or 'cosine'"),
        ("logit", {}, STUDENT, r"distill.losses.1.name: unknown distillation loss 'logit'"),
    ],
)
def test_losses_that_do_not_fit_name_the_key(name, params, student, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, params, student, TEACHER, "distill.losses.1")


def test_recipe_losses_are_checked_on_load(tmp_path):
    recipe = yaml.safe_load((REPO / "launch/recipes/bert_tiny_distill.yaml").read_text())
    del recipe["distill"]["temperature"], recipe["distill"]["alpha"]
    recipe["distill"]["losses"] = [{"name": "logits", "temperature": 1.0}, {"name": "minilm_v2", "weight": 2}]

    def load(**distill):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe | {"distill": recipe["distill"] | distill}))
        return load_config(path)

    with pytest.raises(ConfigError, match=r"r.yaml: distill.losses.1.relation_heads: Field required"):
        load()
    losses = [
        {"name": "hidden", "layers": [[0, 1], [1, 3]]},
        {"name": "hidden", "weight": 0.5, "metric": "cosine"},
    ]
    cfg = load(losses=losses).distill
    assert cfg.loss_entries() == [
        ("hidden", 1.0, {"layers": [[0, 1], [1, 3]]}),
        ("hidden", 0.5, {"metric": "cosine"}),
    ]
    with pytest.raises(ConfigError, match=r"distill.alpha sets the default losses"):
        load(alpha=0.3)
    with pytest.raises(
        ConfigError, match=r"distill.losses.0.name=hidden reads the student's layers.*pipeline"
    ):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe | {"distill": recipe["distill"] | {"losses": losses}}))
        load_config(path, ["parallel.pipeline_parallel=2", "train.deepspeed_config=ds_configs/zero1.json"])
    defaults = DistillConfig(teacher="t", alpha=0.25, temperature=3.0)
    assert defaults.loss_entries() == [("logits", 0.25, {"temperature": 3.0}), ("hard", 0.75, {})]


# --- the logits and hard losses on a real teacher and student ---------------------------------------------


def mlm_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (4, 16), generator=gen)
    labels = torch.where(torch.rand(4, 16, generator=gen) < 0.3, ids, IGNORE_INDEX)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[3, 12:] = 0
    labels[3, 12:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def distillation(teacher, losses, student_cfg=STUDENT, kind="encoder"):
    objective = get_objective("mlm" if kind == "encoder" else "causal_lm", {}, student_cfg)
    cfg = DistillConfig(teacher="t", losses=losses)
    return Distillation.from_config(cfg, teacher, teacher.cfg, student_cfg, objective), objective


def test_logits_and_hard_terms():
    torch.manual_seed(0)
    teacher, student = TransformerLM(TEACHER), TransformerLM(STUDENT)
    d, objective = distillation(
        teacher, [{"name": "logits", "temperature": 2.0}, {"name": "hard", "weight": 0.5}]
    )
    batch = mlm_batch()
    logits = student(**objective.model_inputs(batch))
    terms = d(logits, batch, student.spec)
    hard, count = objective.loss(logits, batch, student.spec)
    assert terms["hard"].count == terms["logits"].count == count
    assert torch.allclose(terms["hard"].sum, 0.5 * hard)
    t_logits = teacher(**objective.model_inputs(batch))
    soft = sum(kl((t_logits[r] / 2).tolist(), (logits[r] / 2).tolist()) for r in range(count)) * 4
    assert terms["logits"].sum.item() == pytest.approx(soft, rel=1e-4)
    twin, _ = distillation(copy.deepcopy(student), [{"name": "logits"}])  # no soft loss left
    assert twin(logits, batch, student.spec)["logits"].sum.abs().item() < 1e-4
    terms["logits"].sum.backward()
    assert student.layers["0"].attn.qkv.weight.grad.abs().sum() > 0


# --- short runs: each kind of loss falls ------------------------------------------------------------------

RUNS = {
    "logits": ([{"name": "logits"}], NARROW, "encoder"),
    "hidden+attention (TinyBERT)": (
        [{"name": "embedding"}, {"name": "hidden"}, {"name": "attention", "form": "probs", "layers": "last"}],
        STUDENT.model_copy(update={"hidden_size": 16, "ffn_hidden_size": 32}), "encoder",
    ),
    "minilm": ([{"name": "minilm"}], STUDENT, "decoder"),
    "minilm_v2": ([{"name": "minilm_v2", "relation_heads": 4, "teacher_layer": 2}], NARROW, "decoder"),
    "hidden cosine": ([{"name": "hidden", "metric": "cosine", "layers": [[1, 3]]}], NARROW, "decoder"),
}  # fmt: skip


@pytest.mark.parametrize("run", list(RUNS))
def test_a_short_distillation_run_lowers_each_loss(run):
    losses, student_cfg, kind = RUNS[run]
    torch.manual_seed(0)
    teacher = TransformerLM(TEACHER.model_copy(update={"kind": kind}))
    student_cfg = student_cfg.model_copy(update={"kind": kind})
    student = TransformerLM(student_cfg)
    state, _ = student_state_from_teacher(
        teacher.state_dict(), student.state_dict(), [1, 3], teacher.cfg, student_cfg
    )
    student.load_state_dict(state)
    d, objective = distillation(teacher, losses, student_cfg, kind)
    params = list(student.parameters()) + list(d.trainable.parameters())
    assert len(d.trainable) == (student_cfg.hidden_size != 32) * sum(
        loss["name"] in ("hidden", "embedding") for loss in losses
    )
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    batch = mlm_batch() if kind == "encoder" else {"input_ids": mlm_batch()["input_ids"]}
    if kind == "decoder":
        batch["labels"] = torch.cat([batch["input_ids"][:, 1:], torch.full((4, 1), IGNORE_INDEX)], 1)
    history = []
    for _ in range(25):
        capture = d.capture()
        logits = student(**objective.model_inputs(batch), **({"capture": capture} if capture else {}))
        terms = d(logits, batch, student.spec)
        loss = sum(term.sum / term.count for term in terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.6 * history[0], history
    assert all(math.isfinite(x) for x in history)


# --- one launch through the trainer ---------------------------------------------------------------------


@pytest.mark.distributed
def test_narrow_tp2_student_trains_on_hidden_states_and_relations(shards, tmp_path):
    """A narrower, shallower student at TP=2 distilled with hidden states through a learned projection,
    MiniLM v2 relations and the logits: each term is logged, the loss falls, and the model directory holds
    the student alone (the projection is not part of it)."""
    from conftest import launch, read_metrics, tiny_recipe, write_recipe

    from plmscale.config import RunConfig
    from plmscale.manifest import load_manifest, tokenizer_path
    from plmscale.model_dir import load_local_model, save_model_dir

    teacher_run = RunConfig.model_validate(
        tiny_recipe(
            shards,
            tmp_path / "teacher",
            model={"num_layers": 4},
            train={"deepspeed_config": "ds_configs/zero2.json"},
        )
    )
    torch.manual_seed(0)
    teacher = TransformerLM(teacher_run.model)
    teacher_dir = save_model_dir(
        tmp_path / "teacher", teacher.state_dict(), teacher_run, tokenizer_path(load_manifest(shards)), {}
    )
    losses = [{"name": "logits", "temperature": 2.0}, {"name": "hard", "weight": 0.5},
              {"name": "hidden", "layers": "uniform"}, {"name": "minilm_v2", "relation_heads": 8}]  # fmt: skip
    recipe = tiny_recipe(
        shards, tmp_path / "student", parallel={"tensor_parallel": 2},
        model={"hidden_size": 32, "ffn_hidden_size": 64, "num_heads": 2},
        train={"train_steps": 6, "eval_interval": 6, "save_interval": 100},
        distill={"teacher": str(teacher_dir), "losses": losses},
    )  # fmt: skip
    out = launch(write_recipe(tmp_path / "student.yaml", recipe), nprocs=2, command="distill")
    assert "student from teacher layers [1, 3]: " in out and "sliced" in out
    rows = read_metrics(tmp_path / "student")
    for name in ("logits", "hard", "hidden", "minilm_v2"):
        assert rows[6][f"loss/{name}"] > 0
    assert rows[6]["loss"] < rows[1]["loss"]
    student, cfg = load_local_model(tmp_path / "student" / "model")  # strict: the student's keys only
    assert cfg.hidden_size == 32 and cfg.num_heads == 2
