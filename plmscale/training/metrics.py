"""Where numbers go: TensorBoard scalars, a metrics.jsonl file (for plots and tests) and a progress bar."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class MetricsLogger:
    """Active on the main rank only; other ranks get a logger that does nothing."""

    def __init__(self, output_dir: Path, enabled: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        if not enabled:
            return
        self.tensorboard_dir = output_dir / "tensorboard"
        self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=start_step or None)
        self.jsonl_path = output_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, as TensorBoard's purge_step does."""
        if not self.jsonl_path.exists():
            return
        kept = [
            line
            for line in self.jsonl_path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        self.jsonl_path.write_text("".join(line + "\n" for line in kept))

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)
        with self.jsonl_path.open("a") as handle:
            handle.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if kind == "train":
            self.bar.set_postfix(
                loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}", tok_s=f"{values['tokens_per_s']:.0f}"
            )
        else:
            self.bar.write(f"step {step} {kind}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.bar.close()
