"""MiniMind-V data: row storage, image preprocessing, the training dataset, collate and sampler."""
