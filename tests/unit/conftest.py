"""Unit tests run on CPU only. Triton kernels run under its interpreter, which must be chosen
before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
