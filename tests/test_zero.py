"""DeepSpeed ZeRO stages 0-3 train the model on 2 gloo processes, and agree with each other."""

import pytest
from conftest import REPO, launch, read_metrics, tiny_recipe, write_recipe

from plmscale.model_dir import load_meta, load_state

pytestmark = pytest.mark.distributed


def test_zero_stages_train_and_agree(shards, tmp_path):
    losses, weights, grad_norms = {}, {}, {}
    for stage in (0, 1, 2, 3):
        output = tmp_path / f"zero{stage}"
        recipe = tiny_recipe(
            shards, output,
            train={"deepspeed_config": str(REPO / "ds_configs" / f"zero{stage}.json"), "save_interval": 100},
        )  # fmt: skip
        launch(write_recipe(tmp_path / f"zero{stage}.yaml", recipe))
        losses[stage] = [row["loss"] for row in read_metrics(output).values()]
        grad_norms[stage] = [row["grad_norm"] for row in read_metrics(output).values()]
        weights[stage] = load_state(output / "model")
        assert load_meta(output / "model")["step"] == 8

    for stage, curve in losses.items():
        assert len(curve) == 8
        assert curve[-1] < curve[0] - 0.3, f"ZeRO-{stage} loss did not fall: {curve}"
        # ZeRO shards optimizer state, gradients and parameters but must not change the math.
        assert curve == pytest.approx(losses[1], rel=1e-4), f"ZeRO-{stage} diverged from ZeRO-1"
        # ZeRO-0's norm comes from plmscale's GuardedAdamW, the others' from DeepSpeed's ZeRO optimizers.
        assert grad_norms[stage] == pytest.approx(grad_norms[1], rel=1e-6), f"ZeRO-{stage} grad_norm"
    # The consolidated weights of ZeRO-3 (gathered from both ranks) match ZeRO-1's.
    for name, tensor in weights[1].items():
        assert weights[3][name].shape == tensor.shape
        assert (weights[3][name] - tensor).abs().max() < 1e-3, name
