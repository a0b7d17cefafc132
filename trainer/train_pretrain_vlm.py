"""MiniMind-V Stage 1, pretraining: align CLIP features to the LM on image captions.

Trains vision_proj and the last LM layer (--freeze_llm 1) from the LM weights (--from_weight llm).

    python trainer/train_pretrain_vlm.py [flags]                        one GPU, or the CPU
    torchrun --nproc_per_node N trainer/train_pretrain_vlm.py [flags]   DDP
Every flag and its default: --help. The loop itself is trainer/train_loop.py.
"""

from trainer.train_loop import cli

if __name__ == "__main__":
    cli("pretrain")
