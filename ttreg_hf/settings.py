"""The values the test-time-register settings take, in a torch-free module: configs, indices and the edit read them."""

from typing import Literal, get_args

RegisterSemantics = Literal["paper", "reference"]
RegisterPatchMode = Literal["zero", "mean", "only_outliers", "same"]
SEMANTICS: tuple[str, ...] = get_args(RegisterSemantics)
PATCH_MODES: tuple[str, ...] = get_args(RegisterPatchMode)
MAX_TEST_TIME_REGISTERS = 64
FLOAT32_MAX = 3.4028234663852886e38  # `torch.finfo(torch.float32).max`, without importing torch
