"""MiniMind-V training: one shared loop (train_loop.py) behind the pretrain and SFT entry points."""
