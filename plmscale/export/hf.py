"""Export a model directory to Hugging Face `transformers` format, and prove the export computes the same.

    plmscale export --model runs/bert_tiny_demo/model --format hf --output exports/bert_tiny_hf

ELECTRA's discriminator and generator are written as two checkpoints (`hf_electra.py`). The encoder is
exactly Megatron-BERT (pre-LN, no embedding LayerNorm, final LayerNorm, BERT's MLM head
tied to the word embedding) and loads as `MegatronBertForMaskedLM`, or with its pair head (pooler and NSP /
SOP classifier) as `MegatronBertForPreTraining`; built with `model.layernorm_position: post` and
`model.embedding_layernorm` it is exactly BERT (`BertForMaskedLM` / `BertForPreTraining`), and without a pair
head also RoBERTa (`--family roberta`: `RobertaForMaskedLM`); with ALBERT's factorized embedding and shared
layers it is exactly ALBERT (`AlbertForMaskedLM` / `AlbertForPreTraining`, SOP head). The decoder is
exactly GPT-2 and loads as `GPT2LMHeadModel`. Only weights are renamed and split (`hf_mapping.py`, which
the import reads backwards); nothing is approximated, so `export_hf` finishes by loading its output with
`transformers` and comparing logits with plmscale's forward.

The tokenizer is written as a fast `tokenizer.json` built from the SentencePiece model. On ordinary text it
yields the ids of `plmscale.tokenizer.Tokenizer.encode`; the encoder's adds [CLS] ... [SEP] around them and
the decoder's a [SEP] before them, the shape of their training inputs (in the decoder's packed stream every
document follows a [SEP]). Special tokens written literally in the text ("[MASK]", "[SEP]") are matched
whole, as BERT's tokenizers do, where SentencePiece spells them out; "[MASK]" takes the word boundary before
it ("the [MASK]." -> ▁the [MASK] .), as a masked token carried its own "▁" in training.

The encoder's tokenizer decodes as SentencePiece does, dropping the dummy "▁" of the first token; the
decoder's keeps it, as GPT-2's keeps a token's leading space. The text-generation pipeline decodes the new
tokens alone and appends them to the prompt: SentencePiece's decode would glue the first new word to the
prompt ("absolute" + "value"). No decoder can both drop that space and space a continuation, which starts
with the same kind of token, so the decoder's `decode(ids)` is SentencePiece's with a leading space when the
first token starts a word.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

from plmscale.config import ConfigError, ModelConfig
from plmscale.export.hf_mapping import hf_config, to_hf_weights
from plmscale.model_dir import CONFIG, TOKENIZER, load_local_model
from plmscale.tokenizer import CLS_ID, SEP_ID, SPECIAL_TOKENS, WORD_START, Tokenizer

HF_WEIGHTS = "model.safetensors"
ATOL = 1e-4  # fp32 forward of the same math in two implementations
CHECK_TEXT = "The quick brown fox, 42 times: naïve café — ünïcode!  Twice  spaced."


def hf_tokenizer(model_path: Path, cfg: ModelConfig) -> PreTrainedTokenizerFast:
    """A fast tokenizer that follows the SentencePiece model's own normalizer and segmentation."""
    Tokenizer(model_path)  # checks plmscale's special ids
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    if proto.trainer_spec.model_type == 1:  # unigram: pieces and scores
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    else:  # BPE: merges are rebuilt from the piece scores
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    cls, sep, mask = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"], SPECIAL_TOKENS["mask"]
    if proto.normalizer_spec.add_dummy_prefix:
        # The dummy prefix moves from the pre-tokenizer (which would add it again after every [MASK]) to the
        # normalizer, where it is added once, as SentencePiece does; [MASK], matched after normalization,
        # then takes the word boundary before it.
        backend.normalizer = normalizers.Sequence(
            [backend.normalizer, normalizers.Replace(Regex(f"\\A(?!{WORD_START})"), WORD_START)]
            + [normalizers.Replace(WORD_START + mask, mask)]
        )
        backend.pre_tokenizer[0].prepend_scheme = "never"  # the converter's Metaspace
    if cfg.kind == "encoder":
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, CLS_ID), (sep, SEP_ID)],
        )
    else:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{sep} $A", pair=f"{sep} $A {sep} $B", special_tokens=[(sep, SEP_ID)]
        )
        # SentencePiece's decoders less the final strip of the first token's space (see above)
        backend.decoder = decoders.Sequence(
            [decoders.Replace(WORD_START, " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    special = {f"{name}_token": token for name, token in SPECIAL_TOKENS.items()}
    special["mask_token"] = AddedToken(mask, special=True, normalized=True)
    if cfg.kind == "decoder":
        special |= {"bos_token": sep, "eos_token": sep}
    else:  # segment ids, as BERT's tokenizers give them: B of a sentence pair is segment 1
        special["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=cfg.max_position_embeddings, **special
    )


def export_hf(model_dir: str | Path, output_dir: str | Path, family: str | None = None) -> Path:
    """Write config.json, model.safetensors and the tokenizer to `output_dir`, then verify them. `family`
    (e.g. "Roberta") picks another transformers family that computes the same as the model's own."""
    model_dir, out = Path(model_dir), Path(output_dir)
    if (out / CONFIG).is_file():  # both write model.safetensors: the export would replace its weights
        raise ConfigError(f"{out}: a plmscale model directory; export to another directory")
    model, cfg = load_local_model(model_dir)
    if cfg.generator_hidden_fraction is not None:  # two checkpoints, the discriminator and the generator
        from plmscale.export.hf_electra import export_electra

        return export_electra(model, model_dir / TOKENIZER, out)
    try:
        config = hf_config(cfg, family)
    except ValueError as err:
        raise ConfigError(f"{model_dir / CONFIG}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    weights = {k: v.contiguous() for k, v in to_hf_weights(model.state_dict(), cfg, family).items()}
    save_file(weights, str(out / HF_WEIGHTS), metadata={"format": "pt"})
    if (model_dir / TOKENIZER).is_file():  # a model imported without a SentencePiece model has none
        hf_tokenizer(model_dir / TOKENIZER, cfg).save_pretrained(out)
    verify_export(model, model_dir / TOKENIZER, out)
    return out


def load_hf_model(directory: str | Path, architecture: str | None = None) -> tuple[PreTrainedModel, dict]:
    """A local checkpoint as `architecture` (default: the one its config names), in fp32 and eval mode,
    with transformers' loading info (missing and unexpected weights). Nothing is downloaded."""
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    cls = getattr(transformers, architecture or config.architectures[0])
    model, info = cls.from_pretrained(
        directory, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def verify_export(model, tokenizer_path: Path, export_dir: str | Path) -> None:
    """Load the export with `transformers`; check it gives plmscale's logits and token ids, or raise."""
    if tokenizer_path.is_file():
        ids = Tokenizer(tokenizer_path).encode([CHECK_TEXT])[0]
        loaded = AutoTokenizer.from_pretrained(export_dir)
        hf_ids = loaded(CHECK_TEXT, add_special_tokens=False, verbose=False)["input_ids"]
        if hf_ids != ids:
            raise RuntimeError(
                f"export {export_dir}: tokenizer.json gives {hf_ids}, SentencePiece gives {ids}"
            )
    hf, info = load_hf_model(export_dir)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"export {export_dir}: transformers could not load every weight: {problems}")
    for what, diff in logit_differences(model, hf).items():
        if diff > ATOL:
            raise RuntimeError(
                f"export {export_dir}: transformers' {type(hf).__name__} differs from plmscale's forward "
                f"(max |{what} logit difference| {diff:.3g}); the weight mapping is wrong"
            )


@torch.inference_mode()
def logit_differences(model, hf: PreTrainedModel) -> dict[str, float]:
    """Max |plmscale logit - transformers logit| on a fixed random batch with a padded row (and segments A and
    B for an encoder with segment embeddings): "token", and "pair" for a model with a pair head."""
    cfg = model.cfg
    seq = min(16, cfg.max_position_embeddings)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, cfg.vocab_size, (2, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, seq // 2 :] = 0  # a padded row checks the padding-mask conversion too
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if cfg.kind == "encoder" and cfg.type_vocab_size >= 2:  # segments A and B check the segment embedding
        inputs["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(2, seq)
    ours = model.eval()(**inputs, classify_pair=True) if cfg.pair_head else (model.eval()(**inputs),)
    out = hf(**inputs)
    pair = "seq_relationship_logits" if "seq_relationship_logits" in out else "sop_logits"  # ALBERT: SOP
    theirs = (out.prediction_logits, out[pair]) if "prediction_logits" in out else (out.logits,)
    return {
        what: (mine.float() - hf_logits.float()).abs().max().item()
        for what, mine, hf_logits in zip(("token", "pair"), ours, theirs, strict=False)
    }
