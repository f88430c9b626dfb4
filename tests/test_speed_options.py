"""Throughput options change speed, not results: channels-last and torch.compile give the same loss."""

import pytest
import torch

from tests.conftest import haystack_batch
from tests.test_stage1 import tiny_module


def _loss(module, batch):
    with torch.no_grad():
        return float(module.diffusion_loss(batch, torch.Generator().manual_seed(0), drop=False))


@pytest.mark.parametrize("option", ["channels_last", pytest.param("compile", marks=pytest.mark.slow)])
def test_option_keeps_the_loss_and_the_checkpoint_keys(tiny_autoencoder, tiny_clip, tiny_t5, option):
    batch = haystack_batch(n=2)
    plain = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5)
    fast = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, **{option: True})
    fast.configure_model()
    if option == "channels_last":
        assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    assert _loss(fast, batch) == pytest.approx(_loss(plain, batch), rel=1e-4)
