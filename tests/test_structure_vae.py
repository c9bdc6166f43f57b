"""Structure VAE: presets and TRELLIS' sizes, the building blocks against hand-written expectations, zero-initialised
residual blocks, loss and metrics, sparse voxels <-> grids, and reconstruction of the shared meshes' structures after
a short training."""

import json
import time

import pytest
import torch
import torch.nn.functional as F

from sparseflex.data.mesh import load_mesh, normalize
from sparseflex.data.sampling import sample_surface
from sparseflex.data.voxelize import active_voxels
from sparseflex.errors import InputError, OptionError
from sparseflex.models import (STRUCTURE_VAE_CONFIGS, StructureVAE, StructureVAEConfig, dice, get_structure_vae_config,
                               grid_to_coords, iou, occupancy_grid, structure_vae_loss)
from sparseflex.models.structure_vae import ChannelLayerNorm3d, ResBlock3d, pixel_shuffle_3d

pytestmark = pytest.mark.usefixtures("one_thread")


def random_grid(batch=2, s=16, fill=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, s, s, s, generator=gen) < fill).float()


def randomise(model, std=0.1, seed=0):
    """Random values in every parameter, zero-initialised ones included (so every branch is live)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


# -- configs and sizes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(STRUCTURE_VAE_CONFIGS))
def test_every_preset_maps_s_to_s_over_4_with_8_channels(name):
    cfg = get_structure_vae_config(name)
    s = cfg.resolution
    assert cfg.downsample_factor == 4 and cfg.latent_resolution == s // 4 and cfg.latent_channels == 8
    with torch.device("meta"):
        model = StructureVAE(name)
        grid = torch.zeros(2, 1, s, s, s)
        out = model(grid)
    assert out.mean.shape == out.logvar.shape == out.z.shape == (2, 8, s // 4, s // 4, s // 4)
    assert out.logits.shape == (2, 1, s, s, s)


def test_cpu_presets_run_for_real_at_other_resolutions():
    for name, s in (("tiny", 16), ("small", 24)):  # fully convolutional: any multiple of 4
        model = StructureVAE(name)
        out = model(random_grid(1, s), generator=torch.Generator().manual_seed(0))
        assert out.logits.shape == (1, 1, s, s, s) and out.mean.shape == (1, 8, s // 4, s // 4, s // 4)
        assert torch.isfinite(out.logits).all()


def _resblock(c):
    # two 3^3 convs with bias and two affine channel LayerNorms
    return 2 * (27 * c * c + c) + 2 * 2 * c


def test_trellis_sizes_equal_trellis_layer_by_layer_count():
    """Parameters counted from TRELLIS' ss_vae_conv3d_16l8 layer list (independently of our modules)."""
    with torch.device("meta"):
        model = StructureVAE("trellis")
    enc = (27 * 32 + 32                                       # input conv 1 -> 32
           + 2 * _resblock(32) + (8 * 32 * 128 + 128)         # stage 32, conv 2^3 stride 2 -> 128
           + 2 * _resblock(128) + (8 * 128 * 512 + 512)       # stage 128 -> 512
           + 2 * _resblock(512) + 2 * _resblock(512)          # stage 512, middle
           + 2 * 512 + (27 * 512 * 16 + 16))                  # LN, conv 512 -> 2 x 8
    dec = (27 * 8 * 512 + 512                                 # input conv 8 -> 512
           + 2 * _resblock(512) + 2 * _resblock(512)          # middle, stage 512
           + (27 * 512 * 1024 + 1024)                         # conv 512 -> 8 x 128, pixel shuffle
           + 2 * _resblock(128) + (27 * 128 * 256 + 256)      # stage 128, conv 128 -> 8 x 32
           + 2 * _resblock(32) + 2 * 32 + (27 * 32 + 1))      # stage 32, LN, conv 32 -> 1
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    print(f"\ntrellis structure VAE: encoder {n_enc:,} + decoder {n_dec:,} = {n_enc + n_dec:,} parameters")
    assert (n_enc, n_dec) == (enc, dec) == (59_298_192, 73_671_201)


def test_parameter_names_follow_trellis_state_dict_layout():
    with torch.device("meta"):
        state = StructureVAE("trellis").state_dict()
    expected = {
        "encoder.input_layer.weight": (32, 1, 3, 3, 3),
        "encoder.blocks.0.norm1.weight": (32,),
        "encoder.blocks.1.conv2.weight": (32, 32, 3, 3, 3),
        "encoder.blocks.2.conv.weight": (128, 32, 2, 2, 2),       # the first downsampling, after 2 blocks
        "encoder.blocks.5.conv.weight": (512, 128, 2, 2, 2),
        "encoder.middle_block.1.conv1.weight": (512, 512, 3, 3, 3),
        "encoder.out_layer.0.weight": (512,),
        "encoder.out_layer.2.weight": (16, 512, 3, 3, 3),
        "decoder.input_layer.weight": (512, 8, 3, 3, 3),
        "decoder.middle_block.0.norm2.bias": (512,),
        "decoder.blocks.2.conv.weight": (1024, 512, 3, 3, 3),     # 8 x 128 channels before the pixel shuffle
        "decoder.blocks.5.conv.weight": (256, 128, 3, 3, 3),
        "decoder.blocks.7.conv2.weight": (32, 32, 3, 3, 3),
        "decoder.out_layer.2.weight": (1, 32, 3, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert not any("skip_connection" in k for k in state)     # every block keeps its width


def test_config_round_trips_through_json_and_validates():
    cfg = get_structure_vae_config("tiny", resolution=48, latent_channels=4)
    again = StructureVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.encoder_channels == (8, 16, 32) and again.latent_resolution == 12
    # the factor follows the number of stages
    two = StructureVAEConfig(resolution=10, encoder_channels=(8, 16), decoder_channels=(16, 8))
    assert (two.downsample_factor, two.latent_resolution) == (2, 5)
    bad = [dict(resolution=30), dict(resolution=0), dict(encoder_channels=(8, 16)), dict(latent_channels=0),
           dict(decoder_channels=(32, 0, 8)), dict(encoder_channels=()), dict(num_res_blocks=-1), dict(unknown=1)]
    for overrides in bad:
        with pytest.raises(OptionError):
            get_structure_vae_config("tiny", **overrides)
    with pytest.raises(OptionError, match="unknown structure VAE config"):
        get_structure_vae_config("huge")


# -- building blocks --------------------------------------------------------------------------------------------------

def test_pixel_shuffle_places_each_channel_in_its_sub_voxel():
    x = torch.randn(2, 3 * 8, 2, 3, 4)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (2, 3, 4, 6, 8)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    assert torch.equal(y[:, c, i::2, j::2, k::2], x[:, c * 8 + i * 4 + j * 2 + k])


def test_channel_layernorm_normalises_each_voxel_over_channels():
    norm = randomise(ChannelLayerNorm3d(6, eps=1e-5))
    x = torch.randn(2, 6, 3, 4, 5) * 3 + 1
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    expected = (x - mu) / torch.sqrt(var + 1e-5) * norm.weight[:, None, None, None] + norm.bias[:, None, None, None]
    torch.testing.assert_close(norm(x), expected)


def test_downsampling_is_a_stride_2_conv_and_upsampling_a_pixel_shuffle():
    model = StructureVAE("tiny")
    down = model.encoder.blocks[1]
    assert (down.conv.kernel_size, down.conv.stride) == ((2, 2, 2), (2, 2, 2))
    x = torch.randn(1, 8, 4, 4, 4)
    # a 2^3 / stride 2 conv is a linear map of each disjoint 2^3 block
    block = x[0, :, :2, 2:4, 0:2].reshape(-1)
    torch.testing.assert_close(down(x)[0, :, 0, 1, 0], down.conv.weight.reshape(16, -1) @ block + down.conv.bias)
    up = model.decoder.blocks[1]
    h = torch.randn(1, 32, 2, 2, 2)
    torch.testing.assert_close(up(h), pixel_shuffle_3d(F.conv3d(h, up.conv.weight, up.conv.bias, padding=1), 2))


def test_fresh_residual_blocks_are_identities_so_the_model_is_its_plain_path():
    model = StructureVAE("tiny")
    blocks = [m for m in model.modules() if isinstance(m, ResBlock3d)]
    assert len(blocks) == 2 * (3 + 1)  # one per stage (3) and one middle block, in encoder and decoder
    for block in blocks:
        c = block.conv1.in_channels
        x = torch.randn(2, c, 4, 4, 4)
        assert torch.equal(block(x), x)
        assert torch.count_nonzero(block.conv2.weight) == 0 and torch.count_nonzero(block.conv2.bias) == 0
    # hence the fresh encoder equals: input conv -> the two downsampling convs -> LN, SiLU, conv
    grid = random_grid(1, 16)
    e = model.encoder
    h = e.blocks[3](e.blocks[1](e.input_layer(grid)))
    mean, logvar = model.encode(grid)
    torch.testing.assert_close(torch.cat([mean, logvar], 1), e.out_layer(h))
    # ... and a randomised block is not the identity
    block = randomise(ResBlock3d(4))
    x = torch.randn(1, 4, 3, 3, 3)
    assert not torch.allclose(block(x), x)


def test_block_with_new_width_uses_a_1x1_conv_skip():
    block = randomise(ResBlock3d(4, 6))
    assert block.skip_connection.kernel_size == (1, 1, 1)
    x = torch.randn(1, 4, 3, 3, 3)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    torch.testing.assert_close(block(x), block.skip_connection(x))


def test_activation_checkpointing_gives_the_same_gradients():
    grid = random_grid(1, 16)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = randomise(StructureVAE(get_structure_vae_config("tiny", use_checkpoint=flag)))
        out = model(grid, generator=torch.Generator().manual_seed(1))
        structure_vae_loss(out.logits, grid, out.mean, out.logvar)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_sampling_follows_the_generator_and_the_posterior():
    mean, logvar = torch.randn(2, 8, 3, 3, 3), torch.randn(2, 8, 3, 3, 3)
    a = StructureVAE.sample(mean, logvar, torch.Generator().manual_seed(5))
    b = StructureVAE.sample(mean, logvar, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, mean + torch.exp(logvar / 2) * eps)
    # forward without sampling decodes the mean
    model = randomise(StructureVAE("tiny"))
    grid = random_grid(1, 16)
    out = model(grid, sample_posterior=False)
    assert torch.equal(out.z, out.mean)
    torch.testing.assert_close(out.logits, model.decode(out.mean))


def test_bad_inputs_are_one_line_errors():
    model = StructureVAE("tiny")
    with pytest.raises(OptionError, match="multiple of 4"):
        model.encode(torch.zeros(1, 1, 18, 18, 18))
    with pytest.raises(InputError):
        model.encode(torch.zeros(1, 16, 16, 16))
    with pytest.raises(InputError):
        model.decode(torch.zeros(1, 4, 4, 4, 4))


# -- loss and metrics -------------------------------------------------------------------------------------------------

def test_kl_of_standard_normal_is_zero_and_mean_over_elements():
    grid = random_grid(2, 8)
    logits = torch.randn(2, 1, 8, 8, 8)
    zeros = torch.zeros(2, 8, 2, 2, 2)
    total, parts = structure_vae_loss(logits, grid, zeros, zeros)
    assert parts["kl"].item() == 0.0
    assert total.item() == pytest.approx(parts["dice"].item())
    # mean 1 in a quarter of the elements: 0.5 * 1 per such element, averaged over all of them
    mean = zeros.clone()
    mean[:, :2] = 1.0
    _, parts = structure_vae_loss(logits, grid, mean, zeros)
    assert parts["kl"].item() == pytest.approx(0.125)
    # logvar = log 2: 0.5 (2 - log 2 - 1) per element
    _, parts = structure_vae_loss(logits, grid, zeros, zeros + torch.log(torch.tensor(2.0)))
    assert parts["kl"].item() == pytest.approx(0.5 * (1 - torch.log(torch.tensor(2.0)).item()))


def test_soft_dice_is_batch_global_and_zero_for_a_perfect_prediction():
    grid = random_grid(2, 8)
    perfect = (grid * 2 - 1) * 40.0
    total, parts = structure_vae_loss(perfect, grid, torch.zeros(2, 8, 2, 2, 2), torch.zeros(2, 8, 2, 2, 2))
    assert parts["dice"].item() < 1e-6 and total.item() < 1e-6
    # p = 1/2 everywhere: 1 - (sum g + 1) / (n / 2 + sum g + 1), sums over the whole batch (TRELLIS' form)
    g, n = grid.sum().item(), grid.numel()
    total, parts = structure_vae_loss(torch.zeros_like(grid), grid, torch.zeros(2, 8, 2, 2, 2),
                                      torch.ones(2, 8, 2, 2, 2), kl_weight=0.5)
    assert parts["dice"].item() == pytest.approx(1 - (g + 1) / (n / 2 + g + 1), rel=1e-5)
    kl = 0.5 * (torch.e - 1 - 1)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(parts["dice"].item() + 0.5 * kl, rel=1e-5)
    # BCE, TRELLIS' other choice
    _, parts = structure_vae_loss(torch.zeros_like(grid), grid, torch.zeros(2, 8, 2, 2, 2),
                                  torch.zeros(2, 8, 2, 2, 2), loss_type="bce")
    assert parts["bce"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    with pytest.raises(OptionError):
        structure_vae_loss(perfect, grid, grid, grid, loss_type="l2")


def test_dice_and_iou_of_known_sets():
    pred = torch.zeros(3, 1, 2, 2, 2, dtype=torch.bool)
    grid = torch.zeros(3, 1, 2, 2, 2)
    pred[0, 0, 0, 0, :] = True          # P = {a, b}, G = {b, c}
    grid[0, 0, 0, 0, 1] = grid[0, 0, 1, 1, 1] = 1
    pred[1], grid[1] = True, 1.0        # equal
    # item 2: both empty
    assert dice(pred, grid).tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert iou(pred, grid).tolist() == pytest.approx([1 / 3, 1.0, 1.0])
    assert dice(pred[:1], torch.zeros(1, 1, 2, 2, 2)).item() == 0.0


# -- sparse voxels <-> grids ------------------------------------------------------------------------------------------

def test_occupancy_grid_and_grid_to_coords_round_trip():
    gen = torch.Generator().manual_seed(0)
    s = 8
    keys = torch.randperm(3 * s ** 3, generator=gen)[:100].sort().values  # unique (batch, x, y, z), sorted
    coords = torch.stack([keys // s ** 3, keys // s ** 2 % s, keys // s % s, keys % s], 1)
    grid = occupancy_grid(coords, s, batch_size=4)
    assert grid.shape == (4, 1, s, s, s) and grid.dtype == torch.float32
    assert grid.sum().item() == 100 and grid[3].sum().item() == 0
    for b, x, y, z in coords.tolist():
        assert grid[b, 0, x, y, z] == 1
    assert torch.equal(grid_to_coords(grid), coords)
    # logits: occupied where > 0 (the threshold is adjustable)
    logits = grid * 4 - 2
    assert torch.equal(grid_to_coords(logits), coords)
    assert len(grid_to_coords(logits, threshold=3.0)) == 0
    # [N, 3] coordinates are one item
    one = occupancy_grid(coords[coords[:, 0] == 1, 1:], s)
    assert one.shape == (1, 1, s, s, s) and torch.equal(one[0], grid[1])
    assert occupancy_grid(torch.zeros(0, 4, dtype=torch.long), s).shape == (1, 1, s, s, s)
    for bad in (torch.tensor([[0, 0, 0, s]]), torch.tensor([[0, -1, 0, 0]]), torch.tensor([[2, 0, 0, 0]])):
        with pytest.raises(InputError):
            occupancy_grid(bad, s, batch_size=2)


# -- reconstruction of real structures --------------------------------------------------------------------------------

# Six structures of several kinds (closed, open, nested shells). ddg_double-torus is left out of training on purpose
# and only reported: at S = 32 the tiny and small models fill the hollow inside its thin tubes early and stay near
# Dice 0.85-0.91 for hundreds of steps, alone or with others. The likely cause: the soft Dice gradient of a voxel
# carries the sigmoid's p (1 - p), so confidently wrong voxels hardly move.
TRAIN_MESHES = ["closed/ajc_spot.obj", "closed/ddg_kitten.obj", "closed/gso_red_cup.obj", "closed/tm_featuretype.STL",
                "open/ddg_cowhead.obj", "interior/om_head3_nested_spheres.ply"]
HELD_OUT_MESHES = ["closed/ddg_gargoyle.obj", "open/gc_moebius.obj", "closed/ddg_double-torus.obj"]
S = 32


def structure_of(path, resolution=S, points=65_536):
    """The mesh's active voxels as data preparation defines them (its default 65,536 surface points, jittered by
    1/4 voxel), as a grid."""
    normed, _ = normalize(load_mesh(path))
    pts, _, _ = sample_surface(normed, points, generator=torch.Generator().manual_seed(0))
    return occupancy_grid(active_voxels(normed, pts, resolution, 0.25), resolution)


@pytest.mark.slow
def test_structure_vae_reconstructs_the_shared_meshes(shared_meshes):
    grids = torch.cat([structure_of(shared_meshes / name) for name in TRAIN_MESHES])
    held_out = torch.cat([structure_of(shared_meshes / name) for name in HELD_OUT_MESHES])
    torch.manual_seed(0)
    model = StructureVAE("tiny")
    # TRELLIS' recipe (AdamW, no weight decay, gradients clipped at norm 1) with a 10x larger rate for a short run;
    # the warm-up keeps the first steps from saturating every logit (all occupied or all empty), where soft Dice
    # has almost no gradient
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))
    gen = torch.Generator().manual_seed(0)
    start, scores, step = time.perf_counter(), torch.zeros(len(grids)), 0
    while step < 400:
        for _ in range(10):
            out = model(grids, generator=gen)
            loss, _ = structure_vae_loss(out.logits, grids, out.mean, out.logvar)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            warmup.step()
            step += 1
        with torch.no_grad():  # reconstruction from the posterior mean, as TRELLIS' snapshots
            scores = dice(model(grids, sample_posterior=False).logits > 0, grids)
        if scores.min() >= 0.95:
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        held = dice(model(held_out, sample_posterior=False).logits > 0, held_out)
    print(f"\nstructure VAE (tiny, S = {S}): {step} steps, {seconds:.0f} s")
    for name, d in zip(TRAIN_MESHES + HELD_OUT_MESHES, scores.tolist() + held.tolist()):
        print(f"  {name:40s} Dice {d:.4f}{'  (held out)' if name in HELD_OUT_MESHES else ''}")
    assert scores.min() >= 0.95, scores
