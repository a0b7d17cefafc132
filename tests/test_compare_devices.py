"""scripts/compare_devices.py: the CPU against itself shows exactly nothing; a real change of numerics shows."""
import pytest

from scripts.compare_devices import Trace, compare, get_parser, run
from tests.train_helpers import make_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cpu_against_itself(tiny_clip, tmp_path):
    data = make_data(tmp_path, n=16) / "sft.parquet"
    args = get_parser().parse_args(["--device", "cpu", "--data_path", str(data), "--vision_model_path", str(tiny_clip),
                                    "--hidden_size", "64", "--num_hidden_layers", "2", "--batch_size", "4",
                                    "--steps", "2", "--variants", "torch_default,bf16_autocast"])
    rows = {r["variant"]: r for r in run(args)["rows"]}
    same, bf16 = rows["torch_default"], rows["bf16_autocast"]
    # the reference's own settings on the same device: bitwise the same run
    assert same["loss_diff_max"] == same["worst_grad_rel"] == same["weight_diff_max"] == 0.0
    # bf16 autocast changes the numbers: every measure sees it
    assert bf16["loss_diff_step1"] > 0 and bf16["worst_grad_rel"] > 1e-4 and bf16["weight_diff_max"] > 0


def test_compare_names_the_most_different_gradient():
    import torch
    ref = Trace(losses=[1.0, 0.5], grads={"a": torch.ones(3), "b": torch.ones(3)}, weights={"w": torch.zeros(2)})
    other = Trace(losses=[1.0, 0.25], grads={"a": torch.ones(3), "b": torch.tensor([1.0, 1.0, 2.0])},
                  weights={"w": torch.tensor([0.0, -0.5])})
    row = compare(ref, other)
    assert row["worst_grad_param"] == "b" and row["worst_grad_rel"] == pytest.approx(1 / 3 ** 0.5)
    assert row["loss_diff_step1"] == 0 and row["loss_diff_max"] == row["loss_diff_last"] == 0.25
    assert row["weight_diff_max"] == 0.5


def test_unknown_variant_is_one_line():
    args = get_parser().parse_args(["--device", "cpu", "--variants", "strict,warp_speed"])
    with pytest.raises(SystemExit, match="unknown warp_speed"):
        run(args)
