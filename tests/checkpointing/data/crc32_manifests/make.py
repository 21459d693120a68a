"""How these steps were made: by main at 5ca73a7 (CRC32 manifests), `python make.py OUT` there. Kept as
fixtures: steps with old manifests must still load and verify."""
import sys

import torch
import torch.nn as nn

from checkpointing import CheckpointConfig, Checkpointer


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.arange(24, dtype=torch.float32).reshape(4, 6))
        self.b = nn.Parameter(torch.linspace(-1, 1, 10))
        self.register_buffer("c", torch.arange(5, dtype=torch.int64))
out = sys.argv[1]
for backend in ("dcp", "hf"):
    m = Small()
    cfg = CheckpointConfig(enable=True, backend=backend, folder=f"crc32_{backend}", interval=1, keep_latest_k=0)
    with Checkpointer(model_parts=[m], checkpoint_config=cfg, base_folder=out) as c:
        c.save(1)
