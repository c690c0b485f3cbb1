"""The ``compile`` option and the GPU settings the README documents, where they run on a
CPU: compiled sampling equals eager (static shapes: the last batch padded), inductor
code equals eager, channels_last and SDPA give the same UNet output, bf16 sampling runs."""

from __future__ import annotations

import pytest
import torch

from components.compile import compile_options, compile_unet, compiled_unet, is_compiled
from components.loader import load_components
from components.personalized import BaseModel
from samplers import build_sampler

CELLS = [("a {} on the beach", 0), ("a {} on the beach", 1), ("a red {}", 0)]


@pytest.fixture(autouse=True)
def reset_dynamo(one_thread):
    """After each test (on conftest's one thread): forget the compiled graphs."""
    yield
    torch._dynamo.reset()


def test_compiled_sampling_equals_eager_with_one_static_shape():
    """compile on the sampling path: the last batch (1 cell of 2) is padded, so dynamo
    sees one shape; images and cost equal eager. The dynamo graph capture is the real
    one; the backend is dynamo's eager one (inductor's code: the next test)."""
    model = BaseModel(load_components("tiny"), superclass="dog")
    sampler = build_sampler("concept", num_steps=2)
    eager = sampler.sample_cells(model, CELLS, seed=0, batch_size=2)
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compile_unet(model.components.unet, {"backend": counter})
    assert is_compiled(model.components.unet)
    out = sampler.sample_cells(model, CELLS, seed=0, batch_size=2)
    assert counter.frame_count == 1  # one shape: compiled once
    assert (out.images - eager.images).abs().max() <= 1e-5
    assert out.cost == eager.cost and out.images.shape == eager.images.shape


def test_inductor_code_equals_eager_on_a_unet_block():
    """torch.compile's default backend (inductor, generated C++ on this CPU) on one of
    the UNet's transformer blocks: the same output to float tolerance."""
    unet = load_components("tiny").unet.eval()
    block = unet.down_blocks[-1].attentions[0] if hasattr(unet.down_blocks[-1], "attentions") else unet.mid_block.attentions[0]
    channels = block.proj_in.in_features if isinstance(block.proj_in, torch.nn.Linear) else block.proj_in.in_channels
    h = torch.randn(2, channels, 4, 4)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = block(h, encoder_hidden_states=ctx).sample
        out = torch.compile(block, dynamic=False)(h, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_channels_last_sdpa_bf16_and_option_validation():
    components = load_components("tiny")
    unet = components.unet.eval()
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())  # SDPA attention
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(10)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        unet.to(memory_format=torch.channels_last)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = unet(x.to(memory_format=torch.channels_last), t, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref, atol=1e-5)
    model = BaseModel(components.to(dtype=torch.bfloat16), superclass="dog")  # bf16 sampling
    images = build_sampler("mixed", num_steps=2).sample_cells(model, CELLS[:1], seed=0).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert compile_options(None) is None and compile_options(False) is None and compile_options("off") is None
    assert compile_options(True) == {"mode": "default"}
    assert compile_options("max-autotune") == {"mode": "max-autotune"}
    assert compile_options({"mode": "reduce-overhead", "channels_last": True}) == {"mode": "reduce-overhead", "channels_last": True}
    with pytest.raises(ValueError, match="max-autotune"):
        compile_options("fastest")
    with compiled_unet(unet, None, {}):  # off: untouched
        assert not is_compiled(unet)
