"""The trainer scripts' command line: numeric flags checked by argparse, every missing input reported
at once in one line each (exit status 2, no traceback), under torchrun by rank 0 only."""
import subprocess

import pytest

from tests.train_helpers import PYTHON, ROOT, TRAINER, subprocess_env, tiny_flags
from trainer.train_loop import MissingPrerequisites, RunFiles, build_parser, check_prerequisites


@pytest.mark.parametrize("flag, value", [
    ("--epochs", "0"), ("--batch_size", "-1"), ("--accumulation_steps", "0"), ("--learning_rate", "0"),
    ("--learning_rate", "nan"), ("--learning_rate", "inf"), ("--grad_clip", "-1"), ("--num_workers", "-1"),
    ("--max_seq_len", "0"), ("--log_interval", "0"), ("--save_interval", "0"), ("--hidden_size", "0"),
    ("--num_hidden_layers", "0"), ("--max_steps", "-1"), ("--seed", "-1"), ("--eval_interval", "-5"),
    ("--eval_limit", "-1"), ("--batch_size", "two"), ("--ddp_timeout", "0"),
])
def test_bad_numbers_are_usage_errors_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser("sft").parse_args([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_good_edge_values_parse():
    args = build_parser("pretrain").parse_args(["--num_workers", "0", "--max_steps", "0", "--eval_interval", "0",
                                                "--learning_rate", "1e-9", "--seed", "0"])
    assert (args.num_workers, args.max_steps, args.eval_interval, args.seed) == (0, 0, 0, 0)


def test_ddp_timeout_reaches_the_process_group(monkeypatch):
    """Rank 0 scores (--eval_data) while the other ranks wait in their next collective: the group's timeout
    is the flag's, not torch's 10-minute NCCL default."""
    import torch.distributed as dist

    from trainer import train_loop
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    args = build_parser("sft").parse_args(["--ddp_timeout", "5400"])
    env = train_loop.setup_distributed("cpu", args.ddp_timeout)
    assert seen == {"backend": "gloo", "timeout": train_loop.timedelta(seconds=5400)}
    assert (env.rank, env.world, env.ddp, env.main) == (1, 2, True, False)
    assert build_parser("pretrain").parse_args([]).ddp_timeout == 1800


def run_trainer(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_two_missing_inputs_two_lines_exit_2_no_traceback(tiny_clip, tmp_path):
    flags = tiny_flags(tmp_path / "nothing.parquet", tiny_clip, tmp_path / "out", from_weight="llm")
    done = run_trainer([PYTHON, str(TRAINER / "train_pretrain_vlm.py"), *flags])
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "missing prerequisites:" and len(lines) == 3, done.stderr
    assert lines[1].startswith(f"  weights: {tmp_path / 'out' / 'llm_64.pth'} not found (")
    assert "--from_weight none" in lines[1]
    assert lines[2].startswith(f"  data: {tmp_path / 'nothing.parquet'} not found (")
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_under_torchrun_rank_0_reports_and_every_rank_exits(tiny_clip, tmp_path):
    flags = tiny_flags(tmp_path / "nothing.parquet", tiny_clip, tmp_path / "out")
    done = run_trainer([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(TRAINER / "train_sft_vlm.py"), *flags])
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert out.count("missing prerequisites:") == 1 and out.count("  data: ") == 1, out


def test_every_kind_of_missing_input_is_named(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    args = build_parser("sft").parse_args(tiny_flags(data, tmp_path / "no_clip", tmp_path / "out",
                                                     tokenizer_path=tmp_path / "no_tok", from_weight="none",
                                                     eval_data=tmp_path / "no_eval.parquet"))
    with pytest.raises(MissingPrerequisites) as e:
        check_prerequisites(args, RunFiles.of(args))
    lines = str(e.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "missing prerequisites", "  images", "  vision encoder", "  tokenizer", "  eval data"]
    assert isinstance(e.value, FileNotFoundError)
    # with the folders in place and a published tokenizer, nothing is missing
    (tmp_path / "images").mkdir()
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    args = build_parser("sft").parse_args(tiny_flags(data, tmp_path / "clip", tmp_path / "out", from_weight="none"))
    assert args.tokenizer_path == str(ROOT / "model" / "tokenizer")
    check_prerequisites(args, RunFiles.of(args))


def test_a_weight_file_of_another_size_is_one_error_not_a_traceback(tiny_clip, tmp_path):
    import torch

    from model.model_vlm import MiniMindVLM, VLMConfig
    from model.weights import save_weights
    from tests.train_helpers import make_data
    data = make_data(tmp_path / "data", n=4)
    torch.manual_seed(0)
    save_weights(MiniMindVLM(VLMConfig(hidden_size=128, num_hidden_layers=2)), tmp_path / "wide_128.pth")
    flags = tiny_flags(data / "sft.parquet", tiny_clip, tmp_path / "out", from_weight=tmp_path / "wide_128.pth")
    done = run_trainer([PYTHON, str(TRAINER / "train_sft_vlm.py"), *flags])
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (f"error: {tmp_path / 'wide_128.pth'} holds a 2-layer, hidden-128 dense model; "
                                   f"--hidden_size 64 disagrees: drop the flag or pick another file")
    assert "Traceback" not in done.stdout


def test_sizes_left_out_come_from_the_from_weight_file(tmp_path):
    import torch

    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from model.weights import WeightMismatchError, save_weights
    from trainer.train_loop import settle_shape
    torch.manual_seed(0)
    save_weights(MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=3)), tmp_path / "llm_64.pth")

    def settled(*argv: str):
        args = build_parser("pretrain").parse_args(["--save_dir", str(tmp_path), *argv])
        settle_shape(args)
        return args.hidden_size, args.num_hidden_layers, args.use_moe

    assert settled("--from_weight", "llm") == (64, 3, 0)  # no llm_512.pth: the only llm_*.pth there
    assert settled("--from_weight", str(tmp_path / "llm_64.pth")) == (64, 3, 0)
    assert settled("--from_weight", "llm", "--hidden_size", "64", "--num_hidden_layers", "3") == (64, 3, 0)
    assert settled("--from_weight", "none") == (512, 8, 0)  # nothing to read: MiniMind2-Small-V
    assert settled("--from_weight", "none", "--hidden_size", "96") == (96, 8, 0)
    with pytest.raises(WeightMismatchError, match="holds a 3-layer, hidden-64 dense model; --num_hidden_layers 8"):
        settled("--from_weight", "llm", "--num_hidden_layers", "8")
