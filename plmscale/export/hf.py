"""Export a model directory to Hugging Face `transformers` format, and prove the export computes the same.

    plmscale export --model runs/bert_tiny_demo/model --format hf --output exports/bert_tiny_hf

The encoder is exactly Megatron-BERT (pre-LN, no embedding LayerNorm, final LayerNorm, BERT's MLM head
tied to the word embedding) and loads as `MegatronBertForMaskedLM`, or with its pair head (pooler and NSP /
SOP classifier) as `MegatronBertForPreTraining`; the decoder is exactly GPT-2 with exact GELU and loads as
`GPT2LMHeadModel`. Only weights are renamed and split; nothing is approximated, so
`export_hf` finishes by loading its output with `transformers` and comparing logits with plmscale's forward.

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
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoTokenizer,
    GPT2Config,
    MegatronBertConfig,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

from plmscale.config import ModelConfig
from plmscale.model_dir import TOKENIZER, load_local_model
from plmscale.tokenizer import CLS_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, WORD_START, Tokenizer

HF_WEIGHTS = "model.safetensors"
ATOL = RTOL = 1e-4  # fp32 forward of the same math in two implementations
CHECK_TEXT = "The quick brown fox, 42 times: naïve café — ünïcode!  Twice  spaced."


def split_qkv(weight: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Our fused QKV rows are [head, (q, k, v), head_dim]; return separate q, k, v (weights or biases)."""
    fused = weight.view(cfg.num_heads, 3, cfg.head_dim, *weight.shape[1:])
    return [fused[:, i].reshape(cfg.hidden_size, *weight.shape[1:]) for i in range(3)]


def megatron_bert_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {
        "bert.embeddings.word_embeddings.weight": state["word_embeddings.weight"],
        "bert.embeddings.position_embeddings.weight": state["position_embeddings.weight"],
        # Megatron-BERT always has segment embeddings: a single zero row adds nothing.
        "bert.embeddings.token_type_embeddings.weight": state.get(
            "token_type_embeddings.weight", torch.zeros(1, cfg.hidden_size)
        ),
        "bert.encoder.ln.weight": state["final_ln.weight"],
        "bert.encoder.ln.bias": state["final_ln.bias"],
        "cls.predictions.transform.dense.weight": state["head.dense.weight"],
        "cls.predictions.transform.dense.bias": state["head.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": state["head.ln.weight"],
        "cls.predictions.transform.LayerNorm.bias": state["head.ln.bias"],
        "cls.predictions.bias": state["head.output.bias"],
    }
    if cfg.pair_head:
        out |= {
            f"{theirs}.{kind}": state[f"pair_head.{ours}.{kind}"]
            for ours, theirs in (("pooler", "bert.pooler.dense"), ("classifier", "cls.seq_relationship"))
            for kind in ("weight", "bias")
        }
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(state[ours + f"attn.qkv.{kind}"], cfg)
            out |= {
                theirs + f"attention.ln.{kind}": state[ours + f"ln_attn.{kind}"],
                theirs + f"attention.self.query.{kind}": q,
                theirs + f"attention.self.key.{kind}": k,
                theirs + f"attention.self.value.{kind}": v,
                theirs + f"attention.output.dense.{kind}": state[ours + f"attn.proj.{kind}"],
                theirs + f"ln.{kind}": state[ours + f"ln_mlp.{kind}"],
                theirs + f"intermediate.dense.{kind}": state[ours + f"mlp.fc_in.{kind}"],
                theirs + f"output.dense.{kind}": state[ours + f"mlp.fc_out.{kind}"],
            }
    return out


def gpt2_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D stores weights as [in, out]: every linear weight is transposed."""
    out = {
        "transformer.wte.weight": state["word_embeddings.weight"],
        "transformer.wpe.weight": state["position_embeddings.weight"],
        "transformer.ln_f.weight": state["final_ln.weight"],
        "transformer.ln_f.bias": state["final_ln.bias"],
    }
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        out |= {
            theirs + "ln_1.weight": state[ours + "ln_attn.weight"],
            theirs + "ln_1.bias": state[ours + "ln_attn.bias"],
            theirs + "attn.c_attn.weight": torch.cat(split_qkv(state[ours + "attn.qkv.weight"], cfg)).T,
            theirs + "attn.c_attn.bias": torch.cat(split_qkv(state[ours + "attn.qkv.bias"], cfg)),
            theirs + "attn.c_proj.weight": state[ours + "attn.proj.weight"].T,
            theirs + "attn.c_proj.bias": state[ours + "attn.proj.bias"],
            theirs + "ln_2.weight": state[ours + "ln_mlp.weight"],
            theirs + "ln_2.bias": state[ours + "ln_mlp.bias"],
            theirs + "mlp.c_fc.weight": state[ours + "mlp.fc_in.weight"].T,
            theirs + "mlp.c_fc.bias": state[ours + "mlp.fc_in.bias"],
            theirs + "mlp.c_proj.weight": state[ours + "mlp.fc_out.weight"].T,
            theirs + "mlp.c_proj.bias": state[ours + "mlp.fc_out.bias"],
        }
    return out


def hf_config(cfg: ModelConfig):
    if cfg.kind == "encoder":
        return MegatronBertConfig(
            vocab_size=cfg.padded_vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.ffn_size,
            hidden_act="gelu",  # exact (erf) GELU, as F.gelu
            hidden_dropout_prob=cfg.hidden_dropout,
            attention_probs_dropout_prob=cfg.attention_dropout,
            max_position_embeddings=cfg.max_position_embeddings,
            type_vocab_size=cfg.type_vocab_size or 1,
            initializer_range=cfg.init_std,
            layer_norm_eps=cfg.layernorm_eps,
            pad_token_id=PAD_ID,
            tie_word_embeddings=True,
            architectures=["MegatronBertForPreTraining" if cfg.pair_head else "MegatronBertForMaskedLM"],
        )
    return GPT2Config(
        vocab_size=cfg.padded_vocab_size,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.ffn_size,
        n_positions=cfg.max_position_embeddings,
        activation_function="gelu",
        resid_pdrop=cfg.hidden_dropout,
        embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.layernorm_eps,
        initializer_range=cfg.init_std,
        # Packed streams end every document with [SEP]: it is the decoder's end-of-text.
        bos_token_id=SEP_ID,
        eos_token_id=SEP_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


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
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=cfg.max_position_embeddings, **special
    )


def export_hf(model_dir: str | Path, output_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer to `output_dir`, then verify them."""
    model_dir, out = Path(model_dir), Path(output_dir)
    model, cfg = load_local_model(model_dir)
    state = model.state_dict()
    weights = megatron_bert_weights(state, cfg) if cfg.kind == "encoder" else gpt2_weights(state, cfg)
    out.mkdir(parents=True, exist_ok=True)
    hf_config(cfg).save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(out / HF_WEIGHTS), metadata={"format": "pt"}
    )
    hf_tokenizer(model_dir / TOKENIZER, cfg).save_pretrained(out)
    verify_export(model, model_dir / TOKENIZER, out)
    return out


def verify_export(model, tokenizer_path: Path, export_dir: str | Path) -> None:
    """Load the export with `transformers`; check it gives plmscale's logits and token ids, or raise."""
    ids = Tokenizer(tokenizer_path).encode([CHECK_TEXT])[0]
    loaded = AutoTokenizer.from_pretrained(export_dir)
    hf_ids = loaded(CHECK_TEXT, add_special_tokens=False, verbose=False)["input_ids"]
    if hf_ids != ids:
        raise RuntimeError(f"export {export_dir}: tokenizer.json gives {hf_ids}, SentencePiece gives {ids}")
    cfg = model.cfg
    auto = {"decoder": AutoModelForCausalLM, "encoder": AutoModelForMaskedLM}[cfg.kind]
    if cfg.pair_head:
        auto = AutoModelForPreTraining
    hf, info = auto.from_pretrained(export_dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"export {export_dir}: transformers could not load every weight: {problems}")
    seq = min(16, cfg.max_position_embeddings)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, cfg.vocab_size, (2, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, seq // 2 :] = 0  # a padded row checks the padding-mask conversion too
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if cfg.kind == "encoder" and cfg.type_vocab_size >= 2:  # segments A and B check the segment embedding
        inputs["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(2, seq)
    with torch.inference_mode():
        ours = model(**inputs, classify_pair=True) if cfg.pair_head else (model(**inputs),)
        out = hf.eval()(**inputs)
    theirs = (out.prediction_logits, out.seq_relationship_logits) if cfg.pair_head else (out.logits,)
    for what, mine, hf_logits in zip(("token", "pair"), ours, theirs, strict=False):
        if not torch.allclose(mine.float(), hf_logits.float(), rtol=RTOL, atol=ATOL):
            diff = (mine.float() - hf_logits.float()).abs().max().item()
            raise RuntimeError(
                f"export {export_dir}: transformers' {type(hf).__name__} differs from plmscale's forward "
                f"(max |{what} logit difference| {diff:.3g}); the weight mapping is wrong"
            )
