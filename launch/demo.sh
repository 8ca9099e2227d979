#!/usr/bin/env bash
# The whole plmscale path on the embedded corpus (the standard library's docstrings; nothing downloaded):
# corpus -> SentencePiece tokenizer -> indexed shards -> pre-train a small BERT with dynamic MLM on 2
# processes (deepspeed launcher, ZeRO-2) -> distill it into a half-depth student -> export the student for
# Hugging Face -> evaluate teacher and student on held-out text and print a report.
#
#   make demo                                              # or, inside the virtualenv: bash launch/demo.sh
#   DEMO_TEACHER_STEPS=20 DEMO_STUDENT_STEPS=10 DEMO_DIR=/tmp/demo bash launch/demo.sh   # a quick pass
#
# Re-running is cheap: finished runs resume from their last checkpoint and stop at once.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${DEMO_DIR:-runs/demo}"
data="$out/data"
teacher_steps="${DEMO_TEACHER_STEPS:-1400}"
student_steps="${DEMO_STUDENT_STEPS:-300}"
start=$(date +%s)
# a shortened run warms up over at most all its steps (the recipes warm up over 50 and 20)
teacher_warmup=$(( teacher_steps < 50 ? teacher_steps : 50 ))
student_warmup=$(( student_steps < 20 ? student_steps : 20 ))

plmscale prep corpus --out "$data/corpus.jsonl"
# 500 pieces: a small vocabulary is learned in fewer steps (and is the recipes' model.vocab_size)
plmscale prep tokenizer --input "$data/corpus.jsonl" --vocab-size 500 --out "$data/tokenizer"
plmscale prep shards --input "$data/corpus.jsonl" --tokenizer "$data/tokenizer/tokenizer.model" \
  --workers 2 --valid-fraction 0.05 --out "$data/shards"

launch/train.sh launch/recipes/bert_tiny_demo.yaml \
  data.shards="$data/shards" train.output_dir="$out/teacher" train.train_steps="$teacher_steps" \
  optimizer.warmup_steps="$teacher_warmup"
launch/train.sh launch/recipes/bert_tiny_distill.yaml --distill \
  data.shards="$data/shards" distill.teacher="$out/teacher/model" train.output_dir="$out/student" \
  train.train_steps="$student_steps" optimizer.warmup_steps="$student_warmup"

plmscale export --model "$out/student/model" --format hf --output "$out/student_hf"
# 32 batches of 8 windows of 32 tokens: the held-out text of 8 windows of 128, ~3,300 masked targets
plmscale eval --teacher "$out/teacher/model" --student "$out/student/model" --shards "$data/shards" \
  --batches 32 --runs teacher="$out/teacher" student="$out/student" --export "$out/student_hf" \
  --plot "$out/loss_curves.png" \
  --fill-mask "Extract a member from the archive as a [MASK] object." \
    "Set or get the [MASK] of bindtags for this widget." \
    "In case this fails, the given parameters are [MASK] as defaults."
# Held-out: sentences of the valid split found nowhere in the training split, each masked word one piece.

# Fine-tune teacher and student on a task made from the corpus (which stdlib package a docstring paragraph is
# from) and print their dev scores side by side: the local stand-in for DistilBERT's GLUE comparison.
plmscale prep task --corpus "$data/corpus.jsonl" --out "$data/task_package"
plmscale finetune --model teacher="$out/teacher/model" student="$out/student/model" \
  --task "$data/task_package" --output "$out/finetuned" --epochs "${DEMO_FINETUNE_EPOCHS:-5}" --lr 5e-4 \
  --max-seq-length 64

echo "demo wall time: $(( $(date +%s) - start )) s"
