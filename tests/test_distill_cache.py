"""The offline cache of the teacher's top-k logits (`plmscale distill-cache`, `distill.teacher_cache`): it
round-trips, data-parallel writers give the same bytes, with the whole vocabulary it gives the live
teacher's loss step by step, with a small k the loss is the renormalized top-k KL written out, and a cache
that is not the run's is rejected before launch, naming the field."""

import math

import pytest
import torch
from conftest import tiny_recipe, write_recipe

from plmscale.cli import main
from plmscale.config import ConfigError, ModelConfig, RunConfig
from plmscale.data.sources import sample_order
from plmscale.distill import Distillation
from plmscale.distill.cache import IDS, LOGITS, CacheError, TeacherCache, WithTeacherTopK, fingerprints
from plmscale.distill.cache_command import write_cache_manifest, write_chunks
from plmscale.distill.losses import Views, build_loss
from plmscale.manifest import load_manifest, tokenizer_path
from plmscale.model import TransformerLM
from plmscale.model_dir import save_model_dir
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.preflight import check_launch
from plmscale.tokenizer import file_sha256

STEPS = 3
SMALL = {"hidden_size": 32, "num_heads": 2, "max_position_embeddings": 32}


def recipe(shards, tmp_path, kind="encoder", **distill) -> dict:
    teacher = tmp_path / f"teacher_{kind}"
    return tiny_recipe(
        shards, tmp_path / "student", kind, model=SMALL | {"num_layers": 1}, data={"seq_length": 32},
        train={"train_steps": STEPS, "micro_batch_size": 8, "global_batch_size": 16},
        distill={"teacher": str(teacher), "losses": [{"name": "logits"}, {"name": "hard", "weight": 0.5}]}
        | distill,
    )  # fmt: skip


def write_teacher(cfg: RunConfig, shards, seed: int = 0) -> TransformerLM:
    # initialized wide: confident, far from uniform outputs, so that the soft loss is not near zero
    teacher_cfg = cfg.model.model_copy(update={"num_layers": 2, "init_std": 0.2})
    torch.manual_seed(seed)
    teacher = TransformerLM(teacher_cfg).eval()
    run = cfg.model_copy(update={"model": teacher_cfg, "distill": None})
    save_model_dir(cfg.distill.teacher, teacher.state_dict(), run, tokenizer_path(load_manifest(shards)), {})
    return teacher


def write_cache(cfg, teacher, directory, top_k, dtype=torch.float16, chunk=12, dp_size=1):
    files = {}
    for rank in range(dp_size):
        files |= write_chunks(cfg, teacher, directory, top_k, dtype, STEPS, chunk, rank, dp_size)
    name = {torch.float16: "float16", torch.float32: "float32"}[dtype]
    write_cache_manifest(cfg, load_manifest(cfg.data.shards), directory, files, top_k, name, STEPS, chunk)


def test_cache_round_trips_and_data_parallel_writers_agree(shards, tmp_path):
    cfg = RunConfig.model_validate(recipe(shards, tmp_path))
    teacher = write_teacher(cfg, shards)
    write_cache(cfg, teacher, tmp_path / "one", top_k=8)  # 48 samples in chunks of 12
    write_cache(cfg, teacher, tmp_path / "two", top_k=8, dp_size=2)  # chunks 0, 2 and 1, 3
    chunks = sorted(path.name for path in (tmp_path / "one").glob("chunk_*"))
    assert chunks == [f"chunk_0000{i}.safetensors" for i in range(4)]
    for name in chunks:
        assert file_sha256(tmp_path / "one" / name) == file_sha256(tmp_path / "two" / name)

    objective = get_objective("mlm", {}, cfg.model)
    source = sample_order(cfg, objective, "train", shuffle=True, dp_size=2, dp_rank=1)  # the student's layout
    cached = WithTeacherTopK(
        sample_order(cfg, objective, "train", True, 2, 1), TeacherCache(tmp_path / "one")
    )
    for step in range(STEPS):
        for batch, with_cache in zip(
            source.micro_batches(step, 1), cached.micro_batches(step, 1), strict=True
        ):
            with torch.no_grad():
                top = teacher(**objective.model_inputs(batch)).topk(8, dim=-1)
            assert with_cache[IDS].dtype == torch.int32 and with_cache[LOGITS].dtype == torch.float16
            assert torch.equal(with_cache[IDS], top.indices.int())
            assert torch.equal(with_cache[LOGITS], top.values.half())  # the bytes written, read back
            assert torch.equal(with_cache["labels"], batch["labels"])
    cache = TeacherCache(tmp_path / "one")
    assert cache.manifest["targets"] == sum(len(cache.rows(p)[0]) for p in range(48))
    batch = source.batch(range(0, 2))
    assert cache.rows(1)[2] == fingerprints(batch)[1]
    batch["labels"][1, batch["labels"][1] != IGNORE_INDEX] += 1  # another sample than the one cached
    with pytest.raises(CacheError, match="sample 1 differs from the one cached"):
        cache.batch_fields(range(0, 2), batch)
    with pytest.raises(CacheError, match="sample 48 is outside the 48 cached"):
        cache.rows(48)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_whole_vocabulary_cache_gives_the_live_teachers_loss_step_by_step(shards, tmp_path, kind):
    """Two students trained 3 steps of 2 micro-batches, one against the live teacher, one against its
    cached top-k with k the whole (padded) vocabulary in float32: the same terms at every step."""
    live_cfg = RunConfig.model_validate(recipe(shards, tmp_path, kind))
    teacher = write_teacher(live_cfg, shards)
    vocab = teacher.cfg.padded_vocab_size
    write_cache(live_cfg, teacher, tmp_path / "all", top_k=vocab, dtype=torch.float32, chunk=16)
    cached_cfg = RunConfig.model_validate(recipe(shards, tmp_path, kind, teacher_cache=str(tmp_path / "all")))
    objective = get_objective(live_cfg.objective.name, {}, live_cfg.model)
    torch.manual_seed(1)
    students = [TransformerLM(live_cfg.model) for _ in range(2)]
    students[1].load_state_dict(students[0].state_dict())
    runs = []
    for cfg, student in zip((live_cfg, cached_cfg), students, strict=True):
        live = None if cfg.distill.teacher_cache else teacher
        distillation = Distillation.from_config(cfg.distill, live, teacher.cfg, cfg.model, objective)
        source = sample_order(cfg, objective, "train", shuffle=True)
        if cfg.distill.teacher_cache:
            source = WithTeacherTopK(source, TeacherCache(cfg.distill.teacher_cache))
        runs.append((student, distillation, source, torch.optim.AdamW(student.parameters(), lr=1e-3)))
    for step in range(STEPS):
        means = []
        for student, distillation, source, optimizer in runs:
            terms = [distillation(student(**objective.model_inputs(b)), b, student.spec)
                     for b in source.micro_batches(step, 2)]  # fmt: skip
            sums = {name: sum(t[name].sum for t in terms) for name in terms[0]}
            counts = {name: sum(t[name].count for t in terms) for name in terms[0]}
            loss = sum(sums[name] / counts[name] for name in sums)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            means.append({name: sums[name].item() / counts[name] for name in sums})
        assert means[0].keys() == {"logits", "hard"}
        for name in means[0]:
            assert means[1][name] == pytest.approx(means[0][name], abs=1e-6), (step, name)
        assert means[0]["logits"] > 0.01  # the two models disagree: the terms compared are not zero


def test_small_k_loss_is_the_renormalized_top_k_kl_written_out():
    gen = torch.Generator().manual_seed(0)
    rows, vocab, k, t = 3, 11, 4, 2.0
    student = torch.randn(rows, vocab, generator=gen) * 3
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)]).int()
    top = (torch.randn(rows, k, generator=gen) * 3).half()
    cfg = ModelConfig(
        kind="encoder", vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, max_position_embeddings=8
    )
    model = TransformerLM(cfg)
    views = Views({IDS: ids, LOGITS: top}, None, model.spec, model.spec, student, None, None, None, None)
    loss = build_loss("logits", {"temperature": t}, model.cfg, model.cfg, "distill.losses.0")
    expected = 0.0
    for r in range(rows):
        scaled = [float(x) / t for x in top[r]]
        p = [math.exp(x) / sum(math.exp(y) for y in scaled) for x in scaled]
        log_z = math.log(sum(math.exp(float(x) / t) for x in student[r]))
        log_q = [float(student[r, int(i)]) / t - log_z for i in ids[r]]
        expected += t * t * sum(p[i] * (math.log(p[i]) - log_q[i]) for i in range(k))
    assert loss(views).item() == pytest.approx(expected, rel=1e-5)


def test_a_cache_that_is_not_the_runs_is_rejected_before_launch(shards, tmp_path, capsys):
    cfg = RunConfig.model_validate(recipe(shards, tmp_path))
    write_cache(cfg, write_teacher(cfg, shards), tmp_path / "c", top_k=4)
    path = write_recipe(tmp_path / "r.yaml", recipe(shards, tmp_path, teacher_cache=str(tmp_path / "c")))
    check_launch(path, [], command="distill", world_size=2)  # the run it was written for, on 2 processes
    check_launch(path, ["train.train_steps=2", "train.global_batch_size=24"], command="distill", world_size=1)
    for overrides, message in [
        (["train.seed=8"], r"was written for another train.seed: 7, the recipe's gives 8"),
        (["data.seq_length=16"], r"another data.seq_length: 32"),
        (["objective.params={mask_prob: 0.2}"], r"another objective.params: \{'mask_prob': 0.15"),
        (["data.train_split=valid"], r"another data.train_split: 'train'"),
        (["train.train_steps=4"], r"train.train_steps=4 x train.global_batch_size=16 needs 64 samples; "
                                  r"distill.teacher_cache=\S+ covers 48"),
        (["distill.losses=[{name: logits}, {name: hidden}]"],
         r"distill.losses.1.name=hidden reads the teacher's layers, which distill.teacher_cache does not"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            check_launch(path, overrides, command="distill", world_size=1)
    other = tmp_path / "other"
    write_cache(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 8})}),
                write_teacher(cfg, shards), other, top_k=4)  # fmt: skip
    with pytest.raises(ConfigError, match="another train.seed"):
        check_launch(path, [f"distill.teacher_cache={other}"], command="distill", world_size=1)
    chunk = tmp_path / "c" / "chunk_00001.safetensors"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\0")
    assert main(["distill", "--config", str(path), "--validate-only"]) == 2
    assert "file corrupt (sha256 differs from its record)" in capsys.readouterr().err
    write_teacher(cfg, shards, seed=1)  # retrained in place
    with pytest.raises(ConfigError, match="another distill.teacher"):
        check_launch(path, ["data.verify_checksums=false"], command="distill", world_size=1)


@pytest.mark.distributed
def test_two_data_parallel_students_read_the_cache_written_by_the_command(shards, tmp_path):
    """`plmscale distill-cache` (k the whole vocabulary, float32), then a distillation on 2 processes that
    reads it, each rank its own half of every step: the first step's terms are those of the live teacher
    on the whole global batch, computed here."""
    from conftest import launch, read_metrics

    from plmscale.distill import student_state_from_teacher

    raw = recipe(shards, tmp_path, teacher_cache=str(tmp_path / "cache"))
    raw["train"] |= {"eval_interval": STEPS, "save_interval": 100}
    cfg = RunConfig.model_validate(raw)
    teacher = write_teacher(cfg, shards)
    path = write_recipe(tmp_path / "r.yaml", raw)
    vocab = str(teacher.cfg.padded_vocab_size)
    argv = ["distill-cache", "--config", str(path), "--top-k", vocab, "--dtype", "float32", "--output"]
    assert main([*argv, str(tmp_path / "cache")]) == 0
    launch(path, nprocs=2, command="distill")
    logged = read_metrics(tmp_path / "student")[1]

    objective = get_objective("mlm", {}, cfg.model)
    student = TransformerLM(cfg.model)
    state, _ = student_state_from_teacher(
        teacher.state_dict(), student.state_dict(), [1], teacher.cfg, cfg.model
    )
    student.load_state_dict(state)
    live = Distillation.from_config(cfg.distill, teacher, teacher.cfg, cfg.model, objective)
    with torch.no_grad():
        terms = [live(student(**objective.model_inputs(b)), b, student.spec)
                 for b in sample_order(cfg, objective, "train", True).micro_batches(0, 2)]  # fmt: skip
    for name in ("logits", "hard"):
        count = sum(t[name].count for t in terms)
        assert logged[f"loss/{name}"] == pytest.approx(
            sum(t[name].sum.item() for t in terms) / count, abs=1e-6
        )
    assert logged["loss/logits"] > 0.01
