"""Test configuration.

Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before ``triton`` is first imported; nothing above this line imports
it (zo_optim imports its Triton backend lazily). On a machine with CUDA the
kernels run natively instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
