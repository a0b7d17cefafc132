"""Two-process DDP on the CPU (gloo, torchrun): pretrain, then SFT with text-only batches, ranks in
lockstep; then the SFT run resumed on one process continues at the right sample."""
import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq

from tests.train_helpers import PYTHON, TRAINER, make_data, metrics, subprocess_env, tiny_flags


def torchrun(script: str, flags: list[str], nproc: int = 2) -> str:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(TRAINER / script), *flags] if nproc > 1 else [PYTHON, str(TRAINER / script), *flags]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def with_text_only_rows(src, dst, n: int) -> None:
    """`src` plus n rows without an image, interleaved: many batches of one row hold no image."""
    table = pq.read_table(src)
    text = [json.dumps([{"role": "user", "content": f"Count to {i % 5 + 1}."},
                        {"role": "assistant", "content": " ".join(str(k) for k in range(1, i % 5 + 2))}])
            for i in range(n)]
    extra = pa.table({"conversations": pa.array(text, table.schema.field("conversations").type),
                      "image_bytes": pa.nulls(n, table.schema.field("image_bytes").type)})
    pq.write_table(pa.concat_tables([table, extra]), dst)


def test_two_process_pretrain_then_sft(tiny_clip, tmp_path):
    data = make_data(tmp_path / "data", n=8)
    out = tmp_path / "out"
    torchrun("train_pretrain_vlm.py", tiny_flags(data / "pretrain.parquet", tiny_clip, out, batch_size=1, epochs=1,
                                                 eval_data=data / "eval.parquet", eval_interval=2, eval_limit=2))
    steps, summary = metrics(out / "pretrain_vlm_64_metrics.jsonl")
    assert summary["steps"] == 4 and summary["samples"] == 8
    assert [r["step"] for r in steps if "eval_accuracy" in r] == [2, 4]  # rank 0 scored; the other rank waited
    assert len(set(summary["rank_weight_sha256"])) == 1 and len(summary["rank_weight_sha256"]) == 2

    sft = tmp_path / "sft_mixed.parquet"
    with_text_only_rows(data / "sft.parquet", sft, 8)  # 16 rows: 8 global steps of 2 ranks x 1 row
    sft_flags = tiny_flags(sft, tiny_clip, out, batch_size=1, epochs=1, from_weight="pretrain_vlm")
    torchrun("train_sft_vlm.py", sft_flags + ["--max_steps", "3"])
    steps, summary = metrics(out / "sft_vlm_64_metrics.jsonl")
    assert summary["steps"] == 3 and len(set(summary["rank_weight_sha256"])) == 1

    # The same run resumed on one process: 6 samples were consumed, the other 10 follow.
    log = torchrun("train_sft_vlm.py", sft_flags + ["--from_resume", "1"], nproc=1)
    assert "continuing at the same sample" in log
    steps, summary = metrics(out / "sft_vlm_64_metrics.jsonl")
    assert summary["samples"] == 10 and summary["steps"] == 16
    assert [r["step"] for r in steps] == list(range(1, 4)) + list(range(7, 17))


def test_bad_rows_of_every_rank_are_summarised(tiny_clip, tmp_path):
    """Each rank meets the bad rows of its own share; rank 0's epoch summary counts them all."""
    data = make_data(tmp_path / "data", n=8)
    table = pq.read_table(data / "pretrain.parquet")
    broken = [0, 3, 4, 7]
    images = table.column("image_bytes").to_pylist()
    for i in broken:
        images[i] = [b"\x89PNG not really"] * len(images[i])
    table = table.set_column(table.schema.get_field_index("image_bytes"), "image_bytes",
                             pa.array(images, table.schema.field("image_bytes").type))
    path = tmp_path / "broken.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    log = torchrun("train_pretrain_vlm.py", tiny_flags(path, tiny_clip, out, batch_size=1, epochs=1))
    assert "broken.parquet: skipped 4 bad row(s): image_decode 4" in log
    _, summary = metrics(out / "pretrain_vlm_64_metrics.jsonl")
    assert summary["bad_rows_last_epoch"] == {"image_decode": 4} and summary["samples"] == 8


def test_accumulation_under_ddp_equals_one_process(tiny_clip, tmp_path):
    """2 ranks x accumulation 2 (no_sync on the first micro-batch) reaches the weights of 1 process x
    accumulation 4: both average the gradients of the same 4 global batches per step."""
    import torch
    data = make_data(tmp_path / "data", n=8)
    runs = {}
    for nproc, accumulation in ((2, 2), (1, 4)):
        out = tmp_path / f"out{nproc}"
        torchrun("train_pretrain_vlm.py", tiny_flags(data / "pretrain.parquet", tiny_clip, out, batch_size=1, epochs=1,
                                                     freeze_llm=0, accumulation_steps=accumulation), nproc=nproc)
        _, summary = metrics(out / "pretrain_vlm_64_metrics.jsonl")
        assert summary["steps"] == 2 and summary["samples"] == 8
        runs[nproc] = torch.load(out / "pretrain_vlm_64_resume.pth", weights_only=True)["model"]
    assert runs[1].keys() == runs[2].keys()
    for k in runs[1]:  # a step of lr 1e-3 that used other gradients would differ by ~1e-3
        torch.testing.assert_close(runs[2][k], runs[1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_packing_under_ddp_equals_padding(tiny_clip, tmp_path):
    """2 ranks x 2 rows: packing each rank's rows (several to a sequence) gives the losses and weights of
    the padded layout: the same rows per rank, the same loss, the same gradients."""
    import torch
    data = make_data(tmp_path / "data", n=8)
    runs, losses = {}, {}
    for packing in (0, 1):
        out = tmp_path / f"packing{packing}"
        torchrun("train_sft_vlm.py", tiny_flags(data / "pretrain.parquet", tiny_clip, out, batch_size=2, epochs=1,
                                                freeze_llm=0, packing=packing, max_seq_len=1000), nproc=2)
        steps, summary = metrics(out / "sft_vlm_64_metrics.jsonl")
        assert summary["steps"] == 2 and summary["samples"] == 8
        losses[packing] = [r["loss"] for r in steps]
        runs[packing] = torch.load(out / "sft_vlm_64_resume.pth", weights_only=True)["model"]
    assert abs(losses[1][0] - losses[0][0]) < 1e-6 and abs(losses[1][1] - losses[0][1]) < 1e-5
    for k in runs[0]:
        # Adam's first steps move each weight by about +-lr (1e-3) whatever the gradient's size, so a
        # weight whose gradient is ~0 can differ by a few 1e-5 from fp32 noise alone; a wrong layout
        # (other rows attended, other images) moves weights by ~1e-3.
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-4, atol=2e-4, msg=k)
