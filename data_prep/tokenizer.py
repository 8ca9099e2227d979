"""Train the SentencePiece tokenizer with the special ids plmscale relies on ([PAD]=0 ... [MASK]=4).

Sentences stream from the readers into the trainer, which keeps a sample of at most
`input_sentence_size` of them, so memory is bounded whatever the corpus size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import sentencepiece as spm

from data_prep import UserError
from data_prep.encode import split_sentences
from data_prep.inputs import scan_inputs
from data_prep.readers import RejectCounter, iter_documents
from plmscale.tokenizer import SPECIAL_TOKENS, TRAINER_SPECIAL_ARGS, Tokenizer, file_sha256

MODEL_TYPES = ("unigram", "bpe")


def train_tokenizer(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    text_field: str = "text",
    vocab_size: int = 8000,
    model_type: str = "unigram",
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    num_threads: int = 1,
    seed: int = 0,
) -> dict:
    """Write tokenizer.model, tokenizer.vocab and the tokenizer.json sidecar; return the sidecar."""
    if model_type not in MODEL_TYPES:
        raise UserError(f"model type {model_type!r} is not one of {MODEL_TYPES}")
    config = {k: v for k, v in locals().items() if k not in ("inputs", "out_dir")}
    counter, sentences = RejectCounter(), [0]
    found = scan_inputs(inputs, counter)
    if not found.sources:
        raise UserError(counter.nothing_written(found))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def sentence_stream():
        for doc in iter_documents(found.sources, counter, text_field):
            counter.written += 1
            for sentence in split_sentences(doc.text):
                sentences[0] += 1
                yield sentence

    spm.set_random_generator_seed(seed)  # the sentence sample is the only random step
    started = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentence_stream(),
            model_prefix=str(out_dir / "tokenizer"),
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            **TRAINER_SPECIAL_ARGS,
            byte_fallback=True,
            minloglevel=2,
        )
    except RuntimeError as exc:  # no sentences, or a vocabulary too large for the corpus
        if counter.written == 0:
            raise UserError(counter.nothing_written(found)) from exc
        raise UserError(f"sentencepiece training failed: {exc}") from exc
    seconds = time.perf_counter() - started
    tokenizer = Tokenizer(out_dir / "tokenizer.model")  # checks the special ids
    sidecar = {
        "format": "plmscale-tokenizer/1",
        "model": "tokenizer.model",
        "sha256": tokenizer.sha256,
        "vocab_sha256": file_sha256(out_dir / "tokenizer.vocab"),
        "vocab_size": tokenizer.vocab_size,
        "special_tokens": SPECIAL_TOKENS,
        "inputs": found.entries,
        "skipped": found.skipped,
        "config": config,
        "counts": {
            "documents_in": counter.documents_in,
            "documents_used": counter.written,
            "documents_rejected": counter.rejected,
            "sentences": sentences[0],
        },
        "rejected": counter.to_dict(),
    }
    (out_dir / "tokenizer.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar | {"seconds": seconds}
