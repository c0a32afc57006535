"""The compressors on a CUDA device: what only a GPU run exercises (CUDA kernels and their dtype coverage).

Skipped where no GPU is present. On a GPU machine: `pytest tests/modules/test_compressors_cuda.py`.
"""

from functools import partial

import pytest
import torch
from test_compressors import MIXED, RAGGED, TILED, paper_default, small_qformer

from hicom.modules.compressors import (
    AvgPoolCompressor,
    BilinearPoolCompressor,
    GlobalCompressor,
    Guide,
    HICom,
    LocalCompressor,
)
from hicom.modules.compressors.reference import hicom_reference, local_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 products in full precision (no TF32) while a test compares against fp32 or fp64 references."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize(
    "make",
    [
        paper_default,
        partial(LocalCompressor, kernel=(4, 3, 3), guide=Guide.FINE, adapt="qkvg", clip_scale=True),
        partial(LocalCompressor, kernel=(4, 3, 3), guide=Guide.COARSE),
        partial(GlobalCompressor, num_queries=3, guide=Guide.FINE, num_heads=2, position="k"),
        partial(AvgPoolCompressor, kernel=(2, 2, 2)),
        BilinearPoolCompressor,
        partial(small_qformer, instruction=True),
        partial(small_qformer, instruction=False, attn_implementation="eager"),
    ],
    ids=["hicom", "local-fine", "local-coarse", "global-fine", "avgpool", "bilinear", "instructblip", "qformer-eager"],
)
@pytest.mark.parametrize("layout", [MIXED, TILED], ids=["overlapping", "tiled"])
def test_bf16_on_cuda_learns_through_every_input(make, layout):
    """The recipe's stage 3 on a GPU: bf16 weights and inputs, and the guide and joint-space keys on the gradient's
    path (the guide encoder and vision head train), so every CUDA kernel's bf16 backward is asked for, the local
    branch's weights of its weighted sum included. The output agrees with fp32 on the CPU at bf16 rounding, and every
    parameter and input gets a finite gradient."""
    torch.manual_seed(0)
    module = make(in_dim=64, out_dim=32, guide_dim=48).eval()
    rows, size = sum(layout.num_frames), (layout.height, layout.width)
    v, e = torch.randn(rows, *size, 64), torch.randn(rows, *size, 64)
    g = torch.randn(len(layout.num_frames), *((7,) if module.guide_tokens else ()), 48)
    expected = module.forward_packed(v, e, g, layout)
    module = module.to(device=CUDA, dtype=torch.bfloat16)
    inputs = [x.to(device=CUDA, dtype=torch.bfloat16).requires_grad_() for x in (v, e, g)]
    out = module.forward_packed(*inputs, layout)
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    error = (out.float().cpu() - expected).norm() / expected.norm()
    assert error < 3e-2, f"relative error {error:.2e} of bf16 on CUDA against fp32 on the CPU"
    out.float().square().mean().backward()
    bad = [name for name, p in module.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not bad
    read = [x for x, reads in zip(inputs, (True, module.uses_embeds, module.uses_guide), strict=True) if reads]
    assert all(x.grad is not None and x.grad.isfinite().all() for x in read)


@pytest.mark.parametrize(
    ("make", "reference"),
    [
        (paper_default, hicom_reference),
        (partial(LocalCompressor, kernel=(4, 3, 3), guide=Guide.COARSE), local_reference),
        (partial(LocalCompressor, kernel=(4, 3, 3), guide=Guide.FINE, adapt="qkvg", clip_scale=True), local_reference),
        (
            partial(
                HICom,
                local=partial(LocalCompressor, kernel=(2, 2, 2), guide=Guide.OFF),
                global_=partial(GlobalCompressor, num_queries=2, guide=Guide.FINE, num_heads=2, position="k"),
            ),
            hicom_reference,
        ),
    ],
    ids=["hicom", "local-coarse", "local-fine", "hicom-off-fine"],
)
@pytest.mark.parametrize("layout", [MIXED, TILED, RAGGED], ids=["overlapping", "tiled", "ragged"])
def test_fp32_on_cuda_equals_the_per_clip_reference(make, reference, layout):
    """The batched path on CUDA (fp32, no TF32) gives the per-clip reference's outputs and gradients, packed images
    and videos of several lengths together."""
    torch.manual_seed(0)
    module = make(in_dim=16, out_dim=8, guide_dim=12).to(CUDA)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    rows, size = sum(layout.num_frames), (layout.height, layout.width)
    v, e = torch.randn(rows, *size, 16, device=CUDA), torch.randn(rows, *size, 16, device=CUDA)
    g = torch.randn(len(layout.num_frames), *((5,) if module.guide_tokens else ()), 12, device=CUDA)
    for x in (v, e, g):
        x.requires_grad_()
    out = module.forward_packed(v, e, g, layout)
    clips = zip(layout.num_frames, layout.modalities, layout.frame_starts, strict=True)
    expected = torch.cat(
        [reference(module, v[s : s + n], e[s : s + n], g[i], modality) for i, (n, modality, s) in enumerate(clips)]
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(out)
    wrt = [v, e, g, *module.parameters()]
    ours = torch.autograd.grad(out, wrt, upstream, allow_unused=True, materialize_grads=True)
    theirs = torch.autograd.grad(expected, wrt, upstream, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["features", "embeds", "guide", *dict(module.named_parameters())], ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"gradient of {name}: {m}")
