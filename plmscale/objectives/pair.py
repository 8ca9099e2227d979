"""BERT's and ALBERT's pre-training: masked LM plus a sentence-pair classifier on the pooled [CLS].

`mlm_nsp` (BERT) predicts whether segment B follows A or comes from another document (pair label 1);
`mlm_sop` (ALBERT) whether A and B were swapped (label 1). Pairs, segment ids and labels come from instances
built by `plmscale prep instances --objective nsp|sop`; a token stream (the held-out split, `plmscale eval`)
has no pairs, and on it these objectives are dynamic MLM, so held-out numbers stay comparable with `mlm`.

The loss is BERT's `masked_lm_loss + next_sentence_loss`: two terms, the MLM loss summed over masked tokens
and the pair loss summed over sequences, each divided by its own global count by the trainer, and added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plmscale.objectives import register
from plmscale.objectives.base import LossTerm
from plmscale.objectives.mlm import MaskedLM


class PairedMaskedLM(MaskedLM):
    """MLM on every batch; on batches with `pair_label`, the model's pair logits and their loss too."""

    instance_fields = MaskedLM.instance_fields | {"segments", "pair_label"}

    def __init__(self, params, model_cfg):
        super().__init__(params, model_cfg)
        if not model_cfg.pair_head:
            raise ValueError(
                f"objective {self.name!r} trains a pair classifier: set model.pair_head: true "
                "(pooler and 2-way classifier on [CLS])"
            )
        if model_cfg.type_vocab_size < 2:
            raise ValueError(f"objective {self.name!r} needs model.type_vocab_size >= 2 for segments A and B")

    def check_instances(self, manifest: dict, key: str = "data.instances") -> None:
        """`pair_label` means B is random in nsp instances and A, B are swapped in sop ones."""
        if manifest["objective"] != self.pair_task:
            has = "a pair_label of another task" if "pair_label" in manifest["fields"] else "no pair_label"
            raise ValueError(
                f"{key}={manifest['directory']} holds {manifest['objective']!r} instances, with {has}; "
                f"objective {self.name!r} trains on {self.pair_task!r} ones (`plmscale prep instances "
                f"--objective {self.pair_task}`)"
            )
        super().check_instances(manifest, key)

    def target_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        counts = {"mlm": self.target_count(batch)}
        return counts | {"pair": batch["pair_label"].numel()} if "pair_label" in batch else counts

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = super().model_inputs(batch)
        return inputs | {"classify_pair": True} if "pair_label" in batch else inputs

    def loss_terms(
        self, outputs, batch: dict[str, torch.Tensor], spec, count_correct: bool = False
    ) -> dict[str, LossTerm]:
        if "pair_label" not in batch:
            return {"mlm": self.token_term(outputs, batch, spec, count_correct)}
        logits, pair_logits = outputs
        labels = batch["pair_label"]
        pair = LossTerm(
            F.cross_entropy(pair_logits.float(), labels, reduction="sum"),
            labels.numel(),
            int((pair_logits.argmax(-1) == labels).sum()),
        )
        return {"mlm": self.token_term(logits, batch, spec, count_correct), "pair": pair}


@register
class MaskedLMNextSentence(PairedMaskedLM):
    name, pair_task = "mlm_nsp", "nsp"


@register
class MaskedLMSentenceOrder(PairedMaskedLM):
    name, pair_task = "mlm_sop", "sop"
