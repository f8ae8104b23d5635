import os
import sys
from pathlib import Path

import torch

# shared helpers (tolerances.py, ops/inputs.py) import by bare name
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "ops"))

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors; it must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
