import itertools
import math
import re
from functools import partial

import pytest
import torch

from hicom.modules.compressors import (
    AvgPoolCompressor,
    BilinearPoolCompressor,
    Compressor,
    GlobalCompressor,
    Guide,
    HICom,
    LocalCompressor,
    QFormerCompressor,
)
from hicom.modules.compressors.base import PackedLayout, group_starts
from hicom.modules.compressors.global_compressor import position_table_3d
from hicom.modules.compressors.local import _packed_plan, gathered_keys
from hicom.modules.compressors.reference import global_reference, hicom_reference, local_reference


def release_groups(n: int, k: int) -> list[list[int]]:
    """The release's grouping, where it runs: ceil(n/k) groups; the first n % groups take k new positions,
    the later ones k - 1 new positions plus the last position of their predecessor."""
    count = math.ceil(n / k)
    fresh = n % count or count
    groups, start = [], 0
    for i in range(count):
        end = start + (k if i < fresh else k - 1)
        begin = start if i < fresh else start - 1
        groups.append(list(range(begin, end)))
        start = end
    return groups


@pytest.mark.parametrize("n, k", [(n, k) for n in range(1, 40) for k in (1, 2, 3, 4)])
def test_grouping_matches_the_release_where_it_runs_and_covers_every_size(n, k):
    starts = group_starts(n, k)
    size = min(n, k)
    groups = [list(range(s, s + size)) for s in starts]
    assert len(groups) == math.ceil(n / k)
    assert sorted({i for g in groups for i in g}) == list(range(n))
    # the local branch's runs rely on this: each position lies in one or two windows, consecutive ones
    holders = [[i for i, g in enumerate(groups) if p in g] for p in range(n)]
    assert all(len(h) in (1, 2) and h[-1] - h[0] == len(h) - 1 for h in holders)
    reference = release_groups(n, k) if n >= k else None
    if reference and all(len(g) == k and g[-1] < n for g in reference):
        assert groups == reference
    assert release_groups(10, 4) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


def local_sweep() -> list:
    """Every length, side, kernel and guide in fp32 (1e-5); in fp64 (1e-10) too, but for the long 27 x 27 clips, where
    the per-cell reference's Python loop takes seconds a case and fp32 has checked the same sizes."""
    cases = []
    for precision, dtype, tolerance in (("fp32", torch.float32, 1e-5), ("fp64", torch.float64, 1e-10)):
        for guide, kernel, hw, t in itertools.product(
            list(Guide), [(1, 1, 1), (2, 2, 2), (4, 3, 3), (4, 4, 4)], [1, 5, 27], [*range(1, 10), 16, 30, 32, 64]
        ):
            if precision == "fp64" and hw == 27 and t >= 16:
                continue
            case_id = f"{precision}-{guide.value}-k{''.join(map(str, kernel))}-{hw}-{t}"
            cases.append(pytest.param(t, hw, kernel, guide, dtype, tolerance, id=case_id))
    return cases


@pytest.mark.parametrize(("t", "hw", "kernel", "guide", "dtype", "tolerance"), local_sweep())
def test_local_equals_the_naive_per_cell_computation(t, hw, kernel, guide, dtype, tolerance):
    torch.manual_seed(0)
    module = LocalCompressor(in_dim=8, out_dim=4, guide_dim=6, kernel=kernel, guide=guide).to(dtype)
    v, e = torch.randn(1, t, hw, hw, 8, dtype=dtype), torch.randn(1, t, hw, hw, 8, dtype=dtype)
    g = torch.randn(1, *((3,) if guide is Guide.FINE else ()), 6, dtype=dtype)
    out = module(v, e, g)
    assert out.shape == (1, module.num_tokens(t, hw, hw), 4)
    torch.testing.assert_close(out[0], local_reference(module, v[0], e[0], g[0]), rtol=tolerance, atol=tolerance)


def test_images_and_single_frames_keep_every_frame():
    module = LocalCompressor(in_dim=8, out_dim=8, kernel=(4, 3, 3), guide=Guide.OFF)
    assert module.num_tokens(1, 27, 27) == 81
    assert module.num_tokens(4, 27, 27, modality="image") == 4 * 81
    assert module.num_tokens(32, 27, 27) == 648


def test_global_attends_with_positions_and_injected_queries():
    torch.manual_seed(0)
    module = GlobalCompressor(in_dim=16, out_dim=8, num_queries=4, guide=Guide.COARSE, num_heads=2)
    v, g = torch.randn(3, 2, 3, 3, 16), torch.randn(3, 16)
    out = module(v, guide=g)
    assert out.shape == (3, 4, 8)
    # the same clip with a different guide gives different tokens
    assert not torch.allclose(module(v, guide=g.roll(1, 0))[0], out[0])
    # queries start equal (zeros, as released) and give distinct tokens once they differ
    assert torch.equal(out[0, 0], out[0, 1])
    with torch.no_grad():
        module.query.normal_()
    out = module(v, guide=g)
    assert not torch.allclose(out[0, 0], out[0, 1])
    # the table grows with larger inputs and agrees with the smaller one where they overlap
    small = position_table_3d(2, 3, 3, 16)
    torch.testing.assert_close(position_table_3d(5, 4, 4, 16)[:2, :3, :3], small)
    assert module(torch.randn(1, 9, 5, 5, 16), guide=g[:1]).shape == (1, 4, 8)


def test_global_positions_reach_keys_only_when_asked():
    torch.manual_seed(0)
    kv = GlobalCompressor(in_dim=16, out_dim=8, num_queries=2, guide=Guide.OFF, position="kv")
    k_only = GlobalCompressor(in_dim=16, out_dim=8, num_queries=2, guide=Guide.OFF, position="k")
    k_only.load_state_dict(kv.state_dict())
    v = torch.randn(1, 2, 2, 2, 16)
    assert not torch.allclose(kv(v), k_only(v))


def test_hicom_puts_local_tokens_before_global_ones():
    torch.manual_seed(0)
    local = lambda **d: LocalCompressor(**d, kernel=(2, 2, 2), guide=Guide.DIRECT)
    global_ = lambda **d: GlobalCompressor(**d, num_queries=3, guide=Guide.COARSE, num_heads=1)
    module = HICom(in_dim=16, out_dim=8, guide_dim=12, local=local, global_=global_)
    v, e, g = torch.randn(2, 4, 4, 4, 16), torch.randn(2, 4, 4, 4, 16), torch.randn(2, 12)
    out = module(v, e, g)
    assert module.num_tokens(4, 4, 4) == 8 + 3 == out.shape[1]
    torch.testing.assert_close(out[:, :8], module.local_compressor(v, e, g))
    torch.testing.assert_close(out[:, 8:], module.global_compressor(v, e, g))
    out.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_each_compressor_names_its_settings():
    """metrics.json's `compressor`: what was built, so that an ablation's runs read apart in a sweep table."""
    local = lambda **d: LocalCompressor(**d, kernel=(4, 3, 3), guide=Guide.OFF, adapt=["v", "k"])
    global_ = lambda **d: GlobalCompressor(**d, num_queries=16, guide=Guide.FINE, position="k", clip_scale=True)
    dims = dict(in_dim=16, out_dim=8, guide_dim=16)
    labels = [
        HICom(**dims, local=local, global_=global_).label,
        HICom(**dims, local=lambda **d: LocalCompressor(**d, kernel=(1, 2, 2), guide=Guide.DIRECT)).label,
        AvgPoolCompressor(**dims, kernel=(2, 2, 2)).label,
        HICom(
            **dims,
            local=lambda **d: LocalCompressor(**d, guide=Guide.DIRECT, keys="features", readout_depth=1),
            global_=lambda **d: GlobalCompressor(**d, num_queries=8, guide=Guide.COARSE, adapt_guide=True),
        ).label,
    ]
    assert labels == [
        "local 4x3x3 unguided adapt k,v + global 16 fine position k clip-scale",
        "local 1x2x2 direct",
        "avgpool 2x2x2",
        "local 4x3x3 direct keys features readout 1 + global 8 coarse adapt g",
    ]


def test_avgpool_averages_projected_tokens_per_cell():
    module = AvgPoolCompressor(in_dim=4, out_dim=4, kernel=(2, 2, 2))
    v = torch.randn(1, 4, 4, 4, 4)
    out = module(v)
    assert out.shape == (1, module.num_tokens(4, 4, 4), 4) == (1, 8, 4)
    projected = module.readout(v)
    torch.testing.assert_close(out[0, 0], projected[0, :2, :2, :2].mean(dim=(0, 1, 2)))
    assert module.num_tokens(5, 7, 7) == 3 * 4 * 4


def test_bad_kernels_are_refused():
    with pytest.raises(ValueError, match="kernel"):
        LocalCompressor(in_dim=8, out_dim=8, kernel=(4, 3, 2))
    with pytest.raises(ValueError, match="kernel"):
        AvgPoolCompressor(in_dim=8, out_dim=8, kernel=(0, 2, 2))
    for depth in (0, -1, 1.5):  # no depth-1 readout built in its place
        with pytest.raises(ValueError, match=f"readout_depth must be a whole number >= 1, got {depth}"):
            AvgPoolCompressor(in_dim=8, out_dim=8, readout_depth=depth)


@pytest.mark.parametrize("make", [LocalCompressor, GlobalCompressor, AvgPoolCompressor])
def test_init_std_is_the_release_fixed_value_or_scaled_to_the_width(make):
    torch.manual_seed(0)
    dims = dict(in_dim=256, out_dim=256, guide_dim=256)
    for std in (0.02, None):
        linears = [m for m in make(**dims, init_std=std).modules() if isinstance(m, torch.nn.Linear)]
        assert linears
        for layer in linears:
            want = layer.in_features**-0.5 if std is None else std
            # a normal truncated at +-2 (absolute) is the plain normal at these stds
            assert layer.weight.std().item() == pytest.approx(want, rel=0.1)
            assert layer.bias is None or not layer.bias.any()
    for bad in (0.0, float("nan"), float("inf"), True, "abc"):  # nan drew from [-2, 2]; true read as 1.0
        with pytest.raises(ValueError, match=r"init_std \(None: 1 / sqrt\(fan_in\)\) must be a finite number > 0"):
            make(**dims, init_std=bad)


@pytest.mark.parametrize("t", [1, 3, 8])
@pytest.mark.parametrize("hw", [1, 5])
@pytest.mark.parametrize("position", ["kv", "k", "none"])
@pytest.mark.parametrize("guide", [Guide.OFF, Guide.DIRECT, Guide.COARSE])
def test_global_with_folded_projections_equals_standard_attention(t, hw, position, guide):
    torch.manual_seed(0)
    module = GlobalCompressor(in_dim=16, out_dim=8, num_queries=3, guide=guide, num_heads=4, position=position)
    module = module.double()
    with torch.no_grad():
        module.query.normal_()
        for layer in module.attn_layer.children():
            layer.bias.normal_()
    v, g = torch.randn(2, t, hw, hw, 16).double(), torch.randn(2, 16).double()
    out = module(v, guide=g)
    assert out.shape == (2, 3, 8)
    for b in range(2):
        torch.testing.assert_close(out[b], global_reference(module, v[b], guide=g[b]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t", [*range(1, 10), 16, 30, 32, 64])
@pytest.mark.parametrize("hw", [1, 5, 27])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_global_paper_default_equals_the_naive_attention_at_every_size(t, hw, dtype, tolerance):
    """The issue's sweep for the global branch (kernels do not apply): coarse injection, positions on k and v."""
    torch.manual_seed(0)
    module = GlobalCompressor(in_dim=16, out_dim=8, guide_dim=12, num_queries=4, guide=Guide.COARSE, num_heads=2)
    module = module.to(dtype)
    with torch.no_grad():
        module.query.normal_()
    v, g = torch.randn(1, t, hw, hw, 16, dtype=dtype), torch.randn(1, 12, dtype=dtype)
    torch.testing.assert_close(
        module(v, guide=g)[0], global_reference(module, v[0], guide=g[0]), rtol=tolerance, atol=tolerance
    )


MIXED = PackedLayout(
    num_frames=(5, 1, 9, 3, 2, 1, 8),
    modalities=("video", "image", "video", "image", "video", "video", "video"),
    height=5,
    width=5,
)
# Every local kernel of the packed test tiles these clips exactly: 12 x 12 frames, lengths a multiple of k_t or
# shorter than it, images.
TILED = PackedLayout(
    num_frames=(4, 1, 8, 3, 2, 1, 12),
    modalities=("video", "image", "video", "image", "video", "video", "video"),
    height=12,
    width=12,
)
# Rows tiled by every kernel, columns and clips not.
RAGGED = PackedLayout(MIXED.num_frames, MIXED.modalities, height=12, width=5)


def paper_default(**dims):
    local = partial(LocalCompressor, kernel=(4, 3, 3), guide=Guide.DIRECT)
    global_ = partial(GlobalCompressor, num_queries=3, guide=Guide.COARSE, num_heads=2)
    return HICom(**dims, local=local, global_=global_)


@pytest.mark.parametrize(
    ("make", "reference"),
    [
        (partial(LocalCompressor, kernel=(4, 3, 3), guide=Guide.OFF), local_reference),
        (partial(LocalCompressor, kernel=(2, 2, 2), guide=Guide.DIRECT), local_reference),
        (partial(LocalCompressor, kernel=(4, 4, 4), guide=Guide.COARSE), local_reference),
        (partial(LocalCompressor, kernel=(4, 3, 3), guide=Guide.DIRECT, keys="features"), local_reference),
        (partial(GlobalCompressor, num_queries=3, guide=Guide.OFF, num_heads=2, position="kv"), global_reference),
        (partial(GlobalCompressor, num_queries=3, guide=Guide.COARSE, num_heads=2, position="k"), global_reference),
        (paper_default, hicom_reference),
        (partial(LocalCompressor, kernel=(4, 3, 3), guide=Guide.FINE), local_reference),
        (partial(LocalCompressor, guide=Guide.COARSE, adapt="qkvg", clip_scale=True), local_reference),
        (partial(LocalCompressor, guide=Guide.DIRECT, adapt="kvg", clip_scale=True), local_reference),
        (partial(LocalCompressor, guide=Guide.OFF, adapt="qkv", clip_scale=True), local_reference),
        (
            partial(LocalCompressor, guide=Guide.COARSE, adapt="qkvg", clip_scale=True, clip_norm="release"),
            local_reference,
        ),
        (partial(LocalCompressor, guide=Guide.OFF, adapt="qkv", clip_scale=True, clip_norm="release"), local_reference),
        (partial(GlobalCompressor, num_queries=3, guide=Guide.FINE, num_heads=2, adapt_guide=True), global_reference),
        (partial(GlobalCompressor, num_queries=3, guide=Guide.COARSE, num_heads=2, clip_scale=True), global_reference),
        (
            partial(
                HICom,
                local=partial(LocalCompressor, guide=Guide.FINE),
                global_=partial(GlobalCompressor, num_queries=2, guide=Guide.DIRECT, num_heads=2),
            ),
            hicom_reference,
        ),
    ],
)
@pytest.mark.parametrize("layout", [MIXED, TILED, RAGGED], ids=["overlapping", "tiled", "ragged"])
def test_a_packed_batch_of_images_and_videos_equals_each_clip_alone(make, reference, layout):
    """Outputs, and the gradients of every parameter and input, equal the per-clip reference's: where windows
    overlap along every axis (the local branch gathers its keys), where they tile every clip (it reads runs of
    keys, one row of cells each), and where they tile only the rows (runs, two rows of cells where frames overlap)."""
    torch.manual_seed(0)
    module = make(in_dim=8, out_dim=4, guide_dim=6).double()
    local = module.local_compressor if isinstance(module, HICom) else module
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    rows, size = sum(layout.num_frames), (layout.height, layout.width)
    v, e = torch.randn(rows, *size, 8).double(), torch.randn(rows, *size, 8).double()
    # the token-level guide C_f (B, L, Dg) where a branch injects finely, else the pooled C_p (B, Dg)
    g = torch.randn(len(layout.num_frames), *((5,) if module.guide_tokens else ()), 6).double()
    for x in (v, e, g):
        x.requires_grad_()
    out = module.forward_packed(v, e, g, layout)
    if isinstance(local, LocalCompressor):  # the plan that call built (direct injection needs no runs): a cache hit
        scored_per_cell, hits = local.guide is not Guide.DIRECT, _packed_plan.cache_info().hits
        runs = _packed_plan(layout, local.kernel, torch.device("cpu"), runs=scored_per_cell).runs
        assert _packed_plan.cache_info().hits == hits + 1
        slots = {MIXED: None, TILED: 1, RAGGED: 2}[layout] if scored_per_cell else None
        assert (None if runs is None else runs.rows.shape[1]) == slots
    expected = [
        reference(module, v[start : start + n], e[start : start + n], g[i], modality)
        for i, (n, modality, start) in enumerate(
            zip(layout.num_frames, layout.modalities, layout.frame_starts, strict=True)
        )
    ]
    for clip, n, modality in zip(expected, layout.num_frames, layout.modalities, strict=True):
        assert clip.shape[0] == module.num_tokens(n, *size, modality)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(out)
    wrt = [v, e, g, *module.parameters()]
    ours = torch.autograd.grad(out, wrt, upstream, allow_unused=True, materialize_grads=True)
    theirs = torch.autograd.grad(torch.cat(expected), wrt, upstream, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["features", "embeds", "guide", *dict(module.named_parameters())], ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_avgpool_packs_through_the_per_shape_default():
    torch.manual_seed(0)
    module = AvgPoolCompressor(in_dim=8, out_dim=4, kernel=(2, 2, 2))
    v = torch.randn(sum(MIXED.num_frames), 5, 5, 8)
    out = module.forward_packed(v, None, None, MIXED)
    start = MIXED.frame_starts[2]
    clip = module(v[None, start : start + 9])[0]
    offset = sum(module.num_tokens(n, 5, 5, m) for n, m in zip(MIXED.num_frames[:2], MIXED.modalities[:2], strict=True))
    torch.testing.assert_close(out[offset : offset + clip.shape[0]], clip)
    assert out.shape[0] == sum(
        module.num_tokens(n, 5, 5, m) for n, m in zip(MIXED.num_frames, MIXED.modalities, strict=True)
    )


def test_every_parameter_of_the_paper_default_gets_a_gradient_from_a_packed_batch():
    torch.manual_seed(0)
    module = paper_default(in_dim=8, out_dim=4, guide_dim=6)
    rows = sum(MIXED.num_frames)
    out = module.forward_packed(
        torch.randn(rows, 5, 5, 8), torch.randn(rows, 5, 5, 8), torch.randn(len(MIXED.num_frames), 6), MIXED
    )
    out.square().mean().backward()
    missing = [name for name, p in module.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize(
    ("guide", "position"), [(Guide.OFF, "kv"), (Guide.OFF, "none"), (Guide.COARSE, "none"), (Guide.DIRECT, "kv")]
)
def test_a_clip_scale_global_branch_is_finite_at_its_init_and_over_padded_frames(guide, position):
    """Unguided (the recipe's stage 1), the learned query and q_proj's bias start at zero: a zero query, which
    unit length made 0 / 0. Packed clips of other lengths pad with zero frames, whose keys are zero without
    positions: NaN gradients before. Every parameter gets a gradient, the direct branch's unused query at zero."""
    torch.manual_seed(0)
    module = GlobalCompressor(
        in_dim=8, out_dim=4, guide_dim=6, num_queries=3, num_heads=2, guide=guide, position=position, clip_scale=True
    )
    rows = sum(MIXED.num_frames)
    guides = torch.randn(len(MIXED.num_frames), 6) if guide is not Guide.OFF else None
    out = module.forward_packed(torch.randn(rows, 5, 5, 8), None, guides, MIXED)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    grads = {name: p.grad for name, p in module.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), grads
    if guide is Guide.DIRECT:
        assert not grads["query"].any()  # SPEC 3, defect 1: the learned query gets no gradient
    with pytest.raises(ValueError, match="num_heads must be a whole number >= 1, got 0"):
        GlobalCompressor(in_dim=8, out_dim=4, num_heads=0)


def test_bilinear_pooling_halves_video_frames_and_keeps_images_whole():
    torch.manual_seed(0)
    module = BilinearPoolCompressor(in_dim=8, out_dim=4)
    assert module.num_tokens(32, 27, 27) == 32 * 196
    assert module.num_tokens(1, 27, 27, modality="image") == 729
    v = torch.randn(2, 3, 5, 5, 8)
    expected = torch.nn.functional.interpolate(
        module.readout(v[0]).permute(0, 3, 1, 2), size=(3, 3), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(module(v)[0], expected.permute(0, 2, 3, 1).reshape(-1, 4))
    # one pass over a mixed batch equals compressing each shape on its own
    packed = torch.randn(sum(MIXED.num_frames), 5, 5, 8)
    out = module.forward_packed(packed, None, None, MIXED)
    torch.testing.assert_close(out, Compressor.forward_packed(module, packed, None, None, MIXED))
    clips = zip(MIXED.num_frames, MIXED.modalities, strict=True)
    assert out.shape == (sum(module.num_tokens(n, 5, 5, modality) for n, modality in clips), 4)
    with pytest.raises(ValueError, match="factor"):
        BilinearPoolCompressor(in_dim=8, out_dim=4, factor=0)


def small_qformer(**kwargs):
    sizes = dict(num_queries=3, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, dropout=0.0)
    return QFormerCompressor(**{**sizes, **kwargs})


def test_qformer_sizes_are_checked_by_name():
    """A Q-Former of no layers built and read nothing of the clip; a zero width or frequency failed in a division."""
    for key, value, message in [
        ("num_layers", 0, "num_layers must be a whole number >= 1, got 0"),
        ("hidden_size", 0, "hidden_size must be a whole number >= 1, got 0"),
        ("cross_attention_frequency", 0, "cross_attention_frequency must be a whole number >= 1, got 0"),
        ("num_heads", 3, "hidden_size 16 is not divisible by num_heads 3"),
        ("instruction", "no", "instruction must be true or false, got 'no'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            small_qformer(in_dim=8, out_dim=4, **{key: value})


@pytest.mark.parametrize("instruction", [False, True])
def test_qformer_packs_mixed_clips_like_each_clip_alone(instruction):
    torch.manual_seed(0)
    module = small_qformer(in_dim=8, out_dim=4, guide_dim=6, instruction=instruction).eval()
    assert module.num_tokens(32, 27, 27) == 3 and module.uses_guide is instruction
    v = torch.randn(sum(MIXED.num_frames), 5, 5, 8)
    g = torch.randn(len(MIXED.num_frames), 7, 6)
    out = module.forward_packed(v, None, g, MIXED)
    assert out.shape == (3 * len(MIXED.num_frames), 4)
    for i, (n, modality, start) in enumerate(zip(MIXED.num_frames, MIXED.modalities, MIXED.frame_starts, strict=True)):
        alone = module.compress(v[start : start + n], None, g[i], modality)
        torch.testing.assert_close(out[3 * i : 3 * i + 3], alone, rtol=1e-5, atol=1e-5)
    # the instruction changes the output only in the instruction-aware form
    other = module.forward_packed(v, None, torch.randn_like(g), MIXED)
    assert not torch.allclose(out, other) if instruction else torch.equal(out, other)


def test_qformer_every_parameter_learns_and_bad_sizes_are_refused():
    torch.manual_seed(0)
    module = small_qformer(in_dim=8, out_dim=4, guide_dim=6, instruction=True)
    module(torch.randn(2, 3, 4, 4, 8), guide=torch.randn(2, 5, 6)).square().mean().backward()
    assert not [name for name, p in module.named_parameters() if p.grad is None]
    with pytest.raises(ValueError, match="num_queries"):
        small_qformer(in_dim=8, out_dim=4, num_queries=0)
    with pytest.raises(ValueError, match="token-level guide"):
        module(torch.randn(1, 2, 4, 4, 8), guide=torch.randn(1, 6))


def test_a_tiny_q_former_on_real_width_tokens_is_named(caplog):
    with caplog.at_level("WARNING", logger="hicom.modules.compressors.qformer"):
        small_qformer(in_dim=16, out_dim=4)  # the tiny default: as wide as its tokens
        assert not caplog.records
        small_qformer(in_dim=128, out_dim=4)  # 16 wide on 128-wide tokens, as 64 on SigLIP's 1152
    assert "set qformer_size=null" in caplog.text and "16-wide Q-Former reads 128-wide" in caplog.text


def test_a_compressor_must_implement_forward_clips_or_forward_packed():
    class Empty(Compressor):
        pass

    with pytest.raises(NotImplementedError, match="neither forward_clips nor forward_packed"):
        Empty()(torch.zeros(1, 2, 3, 3, 4))
    with pytest.raises(NotImplementedError, match="neither forward_clips nor forward_packed"):
        Empty().forward_packed(torch.zeros(2, 3, 3, 4), None, None, PackedLayout((2,), ("video",), 3, 3))


def test_deterministic_mode_takes_the_gather_and_agrees():
    """The local weighted sum uses a bag sum, whose CUDA value gradient deterministic mode refuses; there it gathers."""
    torch.manual_seed(0)
    module = LocalCompressor(in_dim=8, out_dim=4, kernel=(4, 3, 3), guide=Guide.OFF).double()
    rows = sum(MIXED.num_frames)
    v = torch.randn(rows, 5, 5, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for deterministic in (False, True):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            out = module.forward_packed(v, None, None, MIXED)
            results.append((out, *torch.autograd.grad(out.square().sum(), [v, module.readout[0].weight])))
        finally:
            torch.use_deterministic_algorithms(previous)
    for fast, gathered in zip(*results, strict=True):
        torch.testing.assert_close(fast, gathered, rtol=1e-12, atol=1e-12)


def test_gathered_keys_gives_the_same_scores_in_the_release_order():
    torch.manual_seed(0)
    module = LocalCompressor(in_dim=8, out_dim=4, guide_dim=6, kernel=(4, 3, 3), guide=Guide.COARSE).double()
    rows = sum(TILED.num_frames)
    v, e, g = torch.randn(rows, 12, 12, 8).double(), torch.randn(rows, 12, 12, 8).double(), torch.randn(7, 6).double()
    _packed_plan.cache_clear()
    with gathered_keys():
        gathered = module.forward_packed(v, e, g, TILED)
    assert _packed_plan.cache_info().currsize == 1  # the one plan built, without runs
    assert _packed_plan(TILED, module.kernel, torch.device("cpu"), runs=False).runs is None
    assert _packed_plan.cache_info().hits == 1
    torch.testing.assert_close(module.forward_packed(v, e, g, TILED), gathered, rtol=1e-12, atol=1e-12)
    assert _packed_plan(TILED, module.kernel, torch.device("cpu")).runs is not None


@pytest.mark.parametrize(
    "make",
    [
        paper_default,
        partial(LocalCompressor, kernel=(4, 3, 3), guide=Guide.FINE, adapt="qkvg", clip_scale=True),
        partial(GlobalCompressor, num_queries=3, guide=Guide.FINE, num_heads=2, position="k"),
        partial(AvgPoolCompressor, kernel=(2, 2, 2)),
        BilinearPoolCompressor,
        partial(small_qformer, instruction=True),
        partial(small_qformer, instruction=True, attn_implementation="eager"),
    ],
    ids=["hicom", "local-fine", "global-fine", "avgpool", "bilinear", "instructblip", "instructblip-eager"],
)
def test_bf16_weights_and_inputs_agree_with_fp32_and_learn(make):
    """What a GPU run under DeepSpeed bf16 does: weights and inputs in bf16, no autocast. Nothing is promoted back
    to fp32 on the way (a mixed-dtype matmul would fail), the output stays bf16, agrees with the fp32 module at
    bf16 rounding, and every parameter gets a finite gradient."""
    torch.manual_seed(0)
    module = make(in_dim=64, out_dim=32, guide_dim=48).eval()
    rows = sum(MIXED.num_frames)
    v, e = torch.randn(rows, 5, 5, 64), torch.randn(rows, 5, 5, 64)
    g = torch.randn(len(MIXED.num_frames), *((7,) if module.guide_tokens else ()), 48)
    expected = module.forward_packed(v, e, g, MIXED)
    module = module.to(torch.bfloat16)
    out = module.forward_packed(v.bfloat16(), e.bfloat16(), g.bfloat16(), MIXED)
    assert out.dtype == torch.bfloat16
    error = (out.float() - expected).norm() / expected.norm()
    assert error < 3e-2, f"relative error {error:.2e} of bf16 against fp32"
    out.float().square().mean().backward()
    bad = [name for name, p in module.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not bad


@pytest.mark.parametrize("branch", ["global", "local"])
def test_attention_weights_are_fp32_under_bf16_autocast_on_cpu(branch):
    """SPEC 2.3: the attention weights are fp32. What bf16-mixed runs on CPU: fp32 weights and inputs under
    autocast, which makes the score products bf16 and would leave the softmax (not upcast on CPU) in bf16."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Softmaxes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") == "softmax":
                seen.append(out.dtype)
            return out

    torch.manual_seed(0)
    if branch == "global":
        module = GlobalCompressor(in_dim=64, out_dim=32, guide_dim=48, num_queries=4, guide=Guide.COARSE)
    else:
        module = LocalCompressor(in_dim=64, out_dim=32, guide_dim=48, kernel=(2, 2, 2), guide=Guide.COARSE)
    rows = sum(MIXED.num_frames)
    v, e, g = torch.randn(rows, 5, 5, 64), torch.randn(rows, 5, 5, 64), torch.randn(len(MIXED.num_frames), 48)
    expected = module.forward_packed(v, e, g, MIXED)
    with torch.autocast("cpu", dtype=torch.bfloat16), Softmaxes():
        out = module.forward_packed(v, e, g, MIXED)
    assert seen and set(seen) == {torch.float32}
    assert (out.float() - expected).norm() / expected.norm() < 3e-2


def test_the_reference_takes_the_zero_queries_of_an_unguided_clip_scale_global_branch_at_init():
    """Its learned queries start at zero: unit length, they stay zero as F.normalize leaves them (the reference
    divided by their zero length, NaN)."""
    torch.manual_seed(0)
    module = GlobalCompressor(in_dim=8, out_dim=4, guide_dim=8, num_queries=3, num_heads=2, guide=Guide.OFF,
                              clip_scale=True).double()  # fmt: skip
    features = torch.randn(3, 4, 5, 8).double()
    torch.testing.assert_close(module.compress(features), global_reference(module, features), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("branch", ["local", "local-clip-scale-as-released", "global"])
def test_fp16_scores_do_not_overflow_where_the_raw_products_would(branch):
    """What a 16-mixed run (GPUs without bf16) makes: fp16 products, whose largest value is 65504. Tokens 400
    (local) or 10^4 (global, through the folded key projection) long make raw q . k products past it, inf, and
    NaN weights; scaled before the product they stay finite and agree with fp32 at fp16 rounding."""
    torch.manual_seed(0)
    if branch.startswith("local"):  # 3 x 3 cells whose query is their centre token: q . k = |v|^2 = 1.6e5 unscaled
        clip = {"clip_scale": True, "clip_norm": "release"} if branch.endswith("released") else {}  # nothing unit
        module = LocalCompressor(in_dim=256, out_dim=32, guide_dim=256, kernel=(1, 3, 3), guide=Guide.OFF, **clip)
        length = 400.0
    else:
        module = GlobalCompressor(in_dim=256, out_dim=32, guide_dim=256, num_queries=4, num_heads=2, guide=Guide.OFF)
        with torch.no_grad():
            module.query.normal_(std=30)
        length = 1e4
    features = torch.randn(2, 9, 9, 256)
    features = features / features.norm(dim=-1, keepdim=True) * length
    expected = module.compress(features)
    out = module.half().compress(features.half()).float()
    assert out.isfinite().all()
    assert (out - expected).norm() / expected.norm() < 3e-3


def test_unpad_packed_takes_back_the_rows_pad_packed_spread():
    from hicom.modules.compressors.base import pad_packed, unpad_packed

    counts = (3, 1, 5, 2)
    rows = torch.randn(sum(counts), 4, 2)
    padded, real = pad_packed(rows, counts)
    assert padded.shape == (4, 5, 4, 2) and real is not None
    assert torch.equal(unpad_packed(padded, counts), rows)
    assert torch.equal(unpad_packed(padded, counts), padded[real])
    on_meta = unpad_packed(padded.to("meta"), counts)  # no step sized by data: it runs without the values
    assert on_meta.shape == rows.shape


@pytest.mark.parametrize(
    "make",
    [
        paper_default,
        partial(small_qformer, instruction=True),
        small_qformer,
        partial(AvgPoolCompressor, kernel=(2, 2, 2)),
        BilinearPoolCompressor,
    ],
    ids=["hicom", "instructblip", "qformer", "avgpool", "bilinear"],
)
def test_each_compressor_runs_the_meta_check_on_a_video_and_an_image_packed(make, caplog):
    """The build-time check runs each compressor on meta tensors, a video alone and a video and an image packed (the
    Q-Former then masks padding): none fails there, so none is reported as failing on images."""
    from hicom.modules.compressors.base import check_output

    with torch.device("meta"):
        module = make(in_dim=16, out_dim=8, guide_dim=12)
    with caplog.at_level("INFO", logger="hicom.modules.compressors.base"):
        check_output(module, in_dim=16, guide_dim=12, out_dim=8, grid=5, frames=4)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    "make",
    [
        partial(paper_default, in_dim=8, out_dim=4, guide_dim=8),
        partial(LocalCompressor, in_dim=8, out_dim=4, guide=Guide.COARSE),
        partial(LocalCompressor, in_dim=8, out_dim=4, guide=Guide.OFF, adapt="kv"),
        partial(BilinearPoolCompressor, in_dim=8, out_dim=4),
        partial(GlobalCompressor, in_dim=8, out_dim=4, guide=Guide.OFF, num_queries=2, num_heads=2),
    ],
)
def test_a_layout_first_seen_in_inference_mode_still_trains(make):
    """`trainer.validate` or `test` (inference mode) before a fit, or a stage's test before the next stage trains
    in the same process: the index tensors cached for a layout are not inference tensors, which backward could
    not save. fp64 makes the global branch's position table reach the backward uncopied."""
    torch.manual_seed(0)
    module = make().double()
    layout = PackedLayout((5, 1), ("video", "image"), 7, 4)  # a layout no other test builds
    features = torch.randn(6, 7, 4, 8, dtype=torch.float64)
    guide = torch.randn(2, 8, dtype=torch.float64)
    with torch.inference_mode():
        module(features, features, guide, layout=layout)
    module(features, features, guide, layout=layout).square().mean().backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("guide", [Guide.OFF, Guide.COARSE, Guide.DIRECT])
def test_local_clip_scale_attends_with_unit_queries_and_keys_as_spec_writes(guide):
    """SPEC 2.2: softmax(unit(q) . unit(k) * exp(logit_scale) + logit_bias) over the cell. As released (clip_norm:
    release) the embeds and the guide are made unit length instead, and an injected or unguided query keeps its
    length; the two agree where the query is the guide itself."""
    torch.manual_seed(0)
    d = 64
    make = partial(LocalCompressor, in_dim=d, out_dim=d, guide=guide, clip_scale=True)
    spec, released = make(), make(clip_norm="release")
    released.load_state_dict(spec.state_dict())
    for module in (spec, released):
        module.readout = torch.nn.Identity()
    v, e, g = torch.randn(4, 3, 3, d) * 3, torch.randn(4, 3, 3, d), torch.randn(d)
    guide_in = g if spec.uses_guide else None
    unit = partial(torch.nn.functional.normalize, dim=-1)
    scale, bias = spec.logit_scale.exp(), spec.logit_bias

    def attend(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.softmax(keys.reshape(-1, d) @ query * scale + bias, dim=0) @ v.reshape(-1, d)

    def query(g: torch.Tensor | None) -> torch.Tensor:  # 27 -> 9 takes the centre token, 4 -> 1 the middle frames
        centre = (v[1, 1, 1] + v[2, 1, 1]) / 2
        if guide is Guide.DIRECT:
            return g
        return spec.guide_injector(centre[None, None], g[None])[0, 0] if spec.uses_guide else centre

    keys = e if spec.uses_embeds else v
    ours = spec.compress(v, e, guide_in)[0]
    torch.testing.assert_close(ours, attend(unit(query(guide_in)), unit(keys)), rtol=1e-5, atol=1e-5)
    as_released = released.compress(v, e, guide_in)[0]
    if spec.uses_guide:
        expected = attend(query(unit(g)), unit(keys))
    else:
        expected = attend(query(None), keys)
    torch.testing.assert_close(as_released, expected, rtol=1e-5, atol=1e-5)
    assert (guide is Guide.DIRECT) == torch.allclose(as_released, ours, atol=1e-5)


def test_the_q_former_reads_layer_normalised_visual_tokens_as_blip2_does():
    """BLIP-2 passes the vision tower's output through `ln_vision` before its Q-Former: the features here are the
    tower's layer -2, at whatever scale it has, so a clip scaled up reads the same."""
    torch.manual_seed(0)
    module = QFormerCompressor(in_dim=8, out_dim=4, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    module.eval()
    assert "ln_vision.weight" in dict(module.named_parameters())
    v = torch.randn(3, 4, 4, 8)
    torch.testing.assert_close(module.compress(v * 50), module.compress(v), rtol=1e-4, atol=1e-4)
    plain = QFormerCompressor(
        in_dim=8, out_dim=4, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, visual_norm=False
    ).eval()
    assert "unnormed" in plain.label and not torch.allclose(plain.compress(v * 50), plain.compress(v), atol=1e-3)


@pytest.mark.parametrize(
    "make",
    [
        partial(AvgPoolCompressor, kernel=(4, 3, 3)),
        partial(AvgPoolCompressor, kernel=(2, 2, 2)),
        BilinearPoolCompressor,
    ],
)
def test_pooling_baselines_train_in_deterministic_mode_with_the_same_outputs_and_gradients(make, monkeypatch):
    """`trainer.deterministic=true` on a GPU refuses the gradients of adaptive_avg_pool3d and of bilinear
    interpolate (CUDA has no deterministic kernel for them): there the pooling baselines resize by matrix
    products, the same values, which this checks on the CPU, where the two ops refuse as on CUDA."""
    import torch.nn.functional as F

    def refusing(op):
        def call(x, *args, **kwargs):
            if torch.are_deterministic_algorithms_enabled() and x.requires_grad:
                raise RuntimeError(f"{op.__name__} does not have a deterministic implementation (as on CUDA)")
            return op(x, *args, **kwargs)

        return call

    for name in ("adaptive_avg_pool3d", "interpolate"):
        monkeypatch.setattr(F, name, refusing(getattr(F, name)))
    torch.manual_seed(0)
    module = make(in_dim=8, out_dim=4).double()
    layout = PackedLayout((9, 1, 5), ("video", "image", "video"), 7, 10)
    features = torch.randn(15, 7, 10, 8, dtype=torch.float64)
    results = []
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            out = module(features, None, None, layout=layout)
            out.square().sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        results.append((out.detach(), [p.grad.clone() for p in module.parameters()]))
        module.zero_grad()
    (plain, plain_grads), (matrix, matrix_grads) = results
    torch.testing.assert_close(matrix, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(matrix_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
