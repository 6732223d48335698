"""RNG states in the checkpoint format: one CUDA state per rank, that of its training device,
and the rule when the saved and the current run differ (a CUDA state faked where no GPU is)."""
import base64
import json
import random

import numpy as np
import pytest
import torch

from mmtrain.checkpoint.layout import rng_file
from mmtrain.checkpoint.restore import _restore_rng
from mmtrain.seeding import rng_state, set_rng_state

FAKE_CUDA = base64.b64encode(bytes(range(16))).decode()  # the size of a philox state (seed, offset)


def draws():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_a_cuda_state_is_carried_through_the_checkpoint_file_and_applied_only_on_a_gpu(tmp_path):
    cpu = torch.device("cpu")
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    saved = rng_state(cpu)
    assert "cuda" not in saved  # a CPU device has no CUDA stream to save
    expected = draws()
    saved["cuda"] = FAKE_CUDA  # as a GPU rank writes it: its own device's state
    (tmp_path / rng_file(0)).parent.mkdir(parents=True)
    (tmp_path / rng_file(0)).write_text(json.dumps(saved))

    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    lines = []
    _restore_rng(str(tmp_path), "run/train/checkpoint_000000004", 0, lines.append, cpu)
    assert draws() == expected  # the host streams are restored beside it
    assert lines == ["checkpoint_000000004: the checkpoint's CUDA RNG state is not restored: this run's device is cpu"]

    # the other way: a GPU run from a checkpoint written without one keeps its seeded stream
    saved.pop("cuda")
    assert set_rng_state(saved, torch.device("cuda", 0)).startswith("the checkpoint has no CUDA RNG state")
    assert set_rng_state(saved, cpu) is None  # CPU to CPU: nothing to say


@pytest.mark.parametrize("damaged", [["AAAA", "AAAA"], "not base64!", ""])
def test_a_damaged_cuda_state_is_refused(damaged):
    state = {**rng_state(torch.device("cpu")), "cuda": damaged}  # a list: every visible GPU's, not one device's
    with pytest.raises(ValueError, match="CUDA RNG state is not one device's"):
        set_rng_state(json.loads(json.dumps(state)), torch.device("cpu"))
