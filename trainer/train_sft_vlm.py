"""MiniMind-V Stage 2, supervised fine-tuning: instruction conversations about images.

Trains everything but the vision encoder (--freeze_llm 0) from the pretrain weights (--from_weight pretrain_vlm).

    python trainer/train_sft_vlm.py [flags]                        one GPU, or the CPU
    torchrun --nproc_per_node N trainer/train_sft_vlm.py [flags]   DDP
Every flag and its default: --help. The loop itself is trainer/train_loop.py.
"""

from trainer.train_loop import cli

if __name__ == "__main__":
    cli("sft")
