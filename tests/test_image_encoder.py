"""Image conditioning: our DINOv2 against transformers' own (the independent reference), both checkpoint layouts,
position-embedding interpolation, the ViT-L/14-reg preset's size, and image preprocessing (crop, mask, errors)."""

import ast
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sparseflex.data import load_image, preprocess_image
from sparseflex.errors import InputError
from sparseflex.models import ImageEncoder, ImageEncoderConfig, load_image_encoder

transformers = pytest.importorskip("transformers", reason="transformers (the test extra) is the reference")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
            attn_implementation="eager")


def _random_hf(kind: str, seed: int):
    """A tiny transformers DINOv2 with every parameter random (registers and LayerScale included)."""
    if kind == "reg":
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**TINY))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_to_original(sd: dict) -> dict:
    """transformers' checkpoint names -> the DINOv2 repository's (written independently of the library)."""
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "mask_token": sd["embeddings.mask_token"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    for i in range(depth):
        h, o = f"encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[o + f"attn.qkv.{t}"] = torch.cat([sd[h + f"attention.attention.{n}.{t}"]
                                                  for n in ("query", "key", "value")])
            out[o + f"attn.proj.{t}"] = sd[h + f"attention.output.dense.{t}"]
            for n in ("norm1", "norm2"):
                out[o + f"{n}.{t}"] = sd[h + f"{n}.{t}"]
            for n in ("fc1", "fc2"):
                out[o + f"mlp.{n}.{t}"] = sd[h + f"mlp.{n}.{t}"]
        out[o + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[o + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    return out


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """For each kind: the transformers model, its save_pretrained folder, a pytorch_model.bin folder, a .pth."""
    from safetensors.torch import load_file
    root = tmp_path_factory.mktemp("dinov2")
    out = {}
    for seed, kind in enumerate(("reg", "plain")):
        model = _random_hf(kind, seed)
        folder = root / f"hf_{kind}"
        model.save_pretrained(folder)
        saved = load_file(str(folder / "model.safetensors"))
        # the same weights as a pickled HF folder (transformers >= 5 only writes safetensors)
        bin_folder = root / f"bin_{kind}"
        bin_folder.mkdir()
        (bin_folder / "config.json").write_text((folder / "config.json").read_text())
        torch.save(saved, bin_folder / "pytorch_model.bin")
        pth = root / f"dinov2_{kind}.pth"
        torch.save(_hf_to_original(saved), pth)
        out[kind] = dict(model=model, folder=folder, bin=bin_folder, pth=pth, saved=saved)
    return out


def _reference(model, images):
    """transformers' last hidden state before its final layernorm, then a LayerNorm without affine (TRELLIS)."""
    with torch.no_grad():
        out = model((images - MEAN) / STD, output_hidden_states=True)
        pre = out.hidden_states[-1]
        # the hidden state taken is indeed the one the final layernorm is applied to
        torch.testing.assert_close(model.layernorm(pre), out.last_hidden_state, rtol=0, atol=1e-6)
    return F.layer_norm(pre, pre.shape[-1:])


@pytest.mark.parametrize("kind,registers", [("reg", 4), ("plain", 0)])
def test_both_layouts_give_transformers_tokens(refs, kind, registers):
    ref = refs[kind]
    images = torch.rand(2, 3, 56, 56)
    expected = _reference(ref["model"], images)
    with torch.no_grad():
        from_hf = load_image_encoder(ref["folder"])(images)
        from_bin = load_image_encoder(ref["bin"])(images)
        from_pth = load_image_encoder(ref["pth"], num_heads=2)(images)
    assert from_hf.shape == (2, 1 + registers + 16, 64)
    torch.testing.assert_close(from_hf, expected, rtol=0, atol=1e-5)
    assert torch.equal(from_hf, from_bin) and torch.equal(from_hf, from_pth)


@pytest.mark.parametrize("kind", ["reg", "plain"])
@pytest.mark.parametrize("hw", [(98, 70), (28, 42), (56, 70), (60, 60)])
def test_position_interpolation_matches_transformers(refs, kind, hw):
    # larger, smaller, non-square, and a size that is not a multiple of the patch (the conv drops the rest)
    images = torch.rand(1, 3, *hw)
    with torch.no_grad():
        ours = load_image_encoder(refs[kind]["folder"])(images)
    assert ours.shape[1] == 1 + (4 if kind == "reg" else 0) + (hw[0] // 14) * (hw[1] // 14)
    torch.testing.assert_close(ours, _reference(refs[kind]["model"], images), rtol=0, atol=1e-5)


def test_original_layout_interpolates_as_dinov2_hub(refs):
    """The .pth layout has no config: registers -> resize to the grid with antialias (dinov2_vit*14_reg), none ->
    the legacy scale factor (grid + 0.1) / old grid without antialias (dinov2_vit*14)."""
    reg = load_image_encoder(refs["reg"]["pth"], num_heads=2)
    plain = load_image_encoder(refs["plain"]["pth"], num_heads=2)
    assert (reg.config.num_registers, reg.config.image_size, reg.config.depth) == (4, 56, 2)
    assert (reg.config.interpolate_antialias, reg.config.interpolate_offset) == (True, 0.0)
    assert (plain.config.interpolate_antialias, plain.config.interpolate_offset) == (False, 0.1)
    pos = refs["plain"]["saved"]["embeddings.position_embeddings"]
    grid = pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    legacy = F.interpolate(grid, scale_factor=(7.1 / 4, 5.1 / 4), mode="bicubic", align_corners=False)
    expected = torch.cat([pos[:, :1], legacy.permute(0, 2, 3, 1).reshape(1, 35, 64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(plain.interpolate_pos_embed(98, 70), expected, rtol=0, atol=1e-6)
        # the offset matters: a plain resize to 7x5 is measurably different
        resized = F.interpolate(grid, size=(7, 5), mode="bicubic", align_corners=False)
        assert (legacy - resized).abs().max() > 1e-3
        # at the native size nothing is interpolated: the tokens are transformers' again
        images = torch.rand(1, 3, 56, 56)
        torch.testing.assert_close(plain(images), _reference(refs["plain"]["model"], images), rtol=0, atol=1e-5)


def _checkpoint_param_count(width=1024, depth=24, grid=37, patch=14, registers=4, hidden=4096):
    """Parameters of dinov2_vitl14_reg4_pretrain.pth, from its key shapes."""
    shapes = {"cls_token": (1, 1, width), "register_tokens": (1, registers, width),
              "pos_embed": (1, 1 + grid * grid, width), "mask_token": (1, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,)}
    block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
             "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
             "ls1.gamma": (width,), "norm2.weight": (width,), "norm2.bias": (width,),
             "mlp.fc1.weight": (hidden, width), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (width, hidden),
             "mlp.fc2.bias": (width,), "ls2.gamma": (width,)}
    shapes.update({f"blocks.{i}.{k}": s for i in range(depth) for k, s in block.items()})
    return sum(int(np.prod(s)) for s in shapes.values())


def test_vitl14_reg_preset_size_and_shape():
    assert _checkpoint_param_count() == 304_372_736
    with torch.device("meta"):
        ours = ImageEncoder("dinov2-vitl14-reg")
        theirs = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518, patch_size=14))
        tokens = ours(torch.zeros(2, 3, 518, 518))
        base = ImageEncoder("dinov2-vitb14-reg")
        base_theirs = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518, patch_size=14))
    count = sum(p.numel() for p in ours.parameters())
    assert count == 304_372_736 == sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in base.parameters()) == sum(p.numel() for p in base_theirs.parameters())
    assert tokens.shape == (2, 1374, 1024) and ours.config.num_tokens() == 1374


def test_tiny_preset_unconditional_and_big_preset_message():
    model = load_image_encoder("tiny")
    assert isinstance(model.config, ImageEncoderConfig) and not model.training
    with torch.no_grad():
        cond = model(torch.rand(2, 3, 98, 98))
    assert cond.shape == (2, 1 + 4 + 49, 64) and cond.abs().sum() > 0
    neg = model.unconditional(cond)
    assert neg.shape == cond.shape and neg.dtype == cond.dtype and not neg.any()
    with pytest.raises(InputError, match="dinov2_vitl14_reg4_pretrain.pth"):
        load_image_encoder("dinov2-vitl14-reg")


class _Payload:
    def __reduce__(self):  # what a crafted file does; weights_only must refuse it before it runs
        return print, ("unpickled!",)


def _one_line_error(fn, *args, match, **kwargs):
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and re.search(match, message), message
    return message


def test_bad_weight_files_are_one_line_errors(refs, tmp_path, capsys):
    saved = refs["reg"]["saved"]
    original = _hf_to_original(saved)

    def pth(name, payload):
        path = tmp_path / name
        torch.save(payload, path)
        return path

    _one_line_error(load_image_encoder, tmp_path / "nothing.pth", match="nothing.pth: no such file")
    missing = pth("missing.pth", {k: v for k, v in original.items() if k != "blocks.1.ls2.gamma"})
    _one_line_error(load_image_encoder, missing, num_heads=2, match=r"missing\.pth.*missing keys.*blocks\.1\.ls2")
    wrong = pth("wrong.pth", {**original, "blocks.1.attn.proj.weight": torch.zeros(64, 32)})
    _one_line_error(load_image_encoder, wrong, num_heads=2, match=r"wrong\.pth.*blocks\.1\.proj\.weight.*shape")
    extra = pth("extra.pth", {**original, "head.weight": torch.zeros(3)})
    _one_line_error(load_image_encoder, extra, num_heads=2, match=r"extra\.pth: unexpected key head\.weight")
    whole = refs["reg"]["pth"].read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])
    _one_line_error(load_image_encoder, tmp_path / "cut.pth", match=r"cut\.pth: not a readable")
    _one_line_error(load_image_encoder, pth("list.pth", [1, 2]), match=r"list\.pth: not a state dict")
    _one_line_error(load_image_encoder, pth("evil.pth", {"cls_token": _Payload()}), match=r"evil\.pth.*refused")
    assert "unpickled!" not in capsys.readouterr().out

    folder = tmp_path / "hf"
    folder.mkdir()
    _one_line_error(load_image_encoder, folder, match=r"hf: no config\.json")
    config = (refs["reg"]["folder"] / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"dinov2_with_registers"', '"vit"'))
    _one_line_error(load_image_encoder, folder, match=r"config\.json: model_type 'vit'")
    (folder / "config.json").write_text(config.replace('"use_swiglu_ffn": false', '"use_swiglu_ffn": true'))
    _one_line_error(load_image_encoder, folder, match=r"unsupported use_swiglu_ffn=True")
    (folder / "config.json").write_text(config)
    _one_line_error(load_image_encoder, folder, match=r"hf: no model\.safetensors or pytorch_model\.bin")
    weights = (refs["reg"]["folder"] / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) - 100])
    _one_line_error(load_image_encoder, folder, match=r"model\.safetensors: truncated or corrupt")
    (folder / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    (folder / "model.safetensors").write_bytes(weights)
    _one_line_error(load_image_encoder, folder, match=r"model\.safetensors: weights do not match.*blocks\.2\.")


def test_library_does_not_import_transformers():
    import sparseflex.data.images as images
    import sparseflex.models.image_encoder as encoder
    for module in (encoder, images):
        tree = ast.parse(Path(module.__file__).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"transformers", "timm", "torchvision"}, module.__name__


# ------------------------------------------------------------------------------------------------- preprocessing

def _expected_rect(rect, size):
    """Where the rectangle [x0, x1) x [y0, y1) lands in the output: a square of 1.2x its longer side, centred on it,
    scaled to ``size``."""
    x0, x1, y0, y1 = rect
    side = 1.2 * max(x1 - x0, y1 - y0)
    s = size / side
    left, top = (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2
    return (x0 - left) * s, (x1 - left) * s, (y0 - top) * s, (y1 - top) * s


def _canvas(h, w, background, rect, colour, dtype=np.uint8):
    a = np.empty((h, w, len(background)), dtype)
    a[:] = background
    x0, x1, y0, y1 = rect
    a[y0:y1, x0:x1] = colour
    return a


def _rgba_noise_under_transparency(path):
    # garbage colour where alpha is 0: premultiplication must make it black
    rect, colour = (50, 90, 30, 60), (50, 150, 230)
    a = np.random.default_rng(0).integers(0, 256, (160, 200, 4), dtype=np.uint8)
    a[..., 3] = 0
    a[30:60, 50:90] = (*colour, 255)
    Image.fromarray(a).save(path.with_suffix(".png"))
    return path.with_suffix(".png"), rect, np.array(colour) / 255


def _rgba_leaving_the_image(path):
    # touching the left edge and taller than wide: the square leaves the image on the left
    rect, colour = (0, 30, 20, 70), (250, 120, 10)
    a = _canvas(100, 120, (0, 0, 0, 0), rect, (*colour, 255))
    Image.fromarray(a).save(path.with_suffix(".png"))
    return path.with_suffix(".png"), rect, np.array(colour) / 255


def _grey_alpha(path):
    rect, level = (10, 50, 15, 40), 200
    a = _canvas(64, 72, (90, 0), rect, (level, 255))
    Image.merge("LA", [Image.fromarray(a[..., 0]), Image.fromarray(a[..., 1])]).save(path.with_suffix(".png"))
    assert Image.open(path.with_suffix(".png")).mode == "LA"
    return path.with_suffix(".png"), rect, np.full(3, level / 255)


def _rgb_white(path):
    rect, colour = (40, 100, 25, 55), (200, 20, 30)
    Image.fromarray(_canvas(90, 150, (255, 255, 255), rect, colour)).save(path.with_suffix(".png"))
    return path.with_suffix(".png"), rect, np.array(colour) / 255


def _rgb_coloured_background(path):
    rect, colour = (70, 110, 20, 90), (230, 200, 40)
    Image.fromarray(_canvas(120, 160, (77, 128, 51), rect, colour)).save(path.with_suffix(".png"))
    return path.with_suffix(".png"), rect, np.array(colour) / 255


def _grey(path):
    rect, level = (20, 44, 30, 70), 30
    Image.fromarray(_canvas(100, 80, (255,), rect, (level,))[..., 0]).save(path.with_suffix(".png"))
    return path.with_suffix(".png"), rect, np.full(3, level / 255)


def _grey_16bit(path):
    rect, level = (12, 52, 20, 36), 20000
    a = _canvas(64, 64, (60000,), rect, (level,), np.uint16)[..., 0]
    Image.fromarray(a).save(path.with_suffix(".png"))
    assert Image.open(path.with_suffix(".png")).mode.startswith("I")  # really 16 bit on disk
    return path.with_suffix(".png"), rect, np.full(3, level / 65535)  # 8 bit would be 78/255, 7e-4 away


def _palette(path):
    rect, colour = (25, 75, 10, 50), (40, 220, 90)
    im = Image.new("P", (100, 80), 0)
    im.putpalette([255, 0, 255, *colour] + [0, 0, 0] * 254)  # index 0 (magenta) is the transparent one
    im.paste(1, (rect[0], rect[2], rect[1], rect[3]))
    im.save(path.with_suffix(".png"), transparency=0)
    return path.with_suffix(".png"), rect, np.array(colour) / 255


def _jpeg(path):
    # edges on the 8x8 block grid, so the compression noise stays within the background tolerance
    rect, colour = (48, 88, 32, 64), (20, 40, 160)
    Image.fromarray(_canvas(112, 136, (255, 255, 255), rect, colour)).save(path.with_suffix(".jpg"), quality=95)
    return path.with_suffix(".jpg"), rect, np.array(colour) / 255


def _webp(path):
    rect, colour = (20, 60, 30, 50), (180, 60, 200)
    a = _canvas(80, 90, (0, 0, 0, 0), rect, (*colour, 255))
    Image.fromarray(a).save(path.with_suffix(".webp"), lossless=True)
    return path.with_suffix(".webp"), rect, np.array(colour) / 255


CASES = {"rgba": _rgba_noise_under_transparency, "rgba-edge": _rgba_leaving_the_image, "grey-alpha": _grey_alpha,
         "rgb-white": _rgb_white, "rgb-coloured": _rgb_coloured_background, "grey": _grey, "grey-16bit": _grey_16bit,
         "palette": _palette, "jpeg": _jpeg, "webp": _webp}


@pytest.mark.parametrize("case", list(CASES))
def test_preprocess_crops_the_object(tmp_path, case):
    path, rect, colour = CASES[case](tmp_path / case)
    size = 96
    out = preprocess_image(path, size=size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    img = out.numpy()
    ex0, ex1, ey0, ey1 = _expected_rect(rect, size)
    # the rectangle's box in the output, at half its brightness, lands where 1.2x-square cropping says
    inside = img.max(axis=0) > 0.5 * colour.max()
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    tol = 1.5 if case == "jpeg" else 1.0
    for got, want in ((cols[0], ex0), (cols[-1] + 1, ex1), (rows[0], ey0), (rows[-1] + 1, ey1)):
        assert abs(got - want) <= tol, (case, (cols[0], cols[-1] + 1, rows[0], rows[-1] + 1), (ex0, ex1, ey0, ey1))
    # its colour inside, away from the edges (Lanczos keeps flat areas exact)
    m = 6
    core = img[:, int(np.ceil(ey0)) + m:int(ey1) - m, int(np.ceil(ex0)) + m:int(ex1) - m]
    assert core.size > 0
    np.testing.assert_allclose(core.reshape(3, -1).T, np.broadcast_to(colour, (core[0].size, 3)),
                               atol=0.03 if case == "jpeg" else 1e-5)
    # the background, beyond the Lanczos kernel's reach (3 input pixels), is black: premultiplied onto black
    reach = 3 * size / (1.2 * max(rect[1] - rect[0], rect[3] - rect[2])) + 2
    yy, xx = np.mgrid[:size, :size] + 0.5
    far = (xx < ex0 - reach) | (xx > ex1 + reach) | (yy < ey0 - reach) | (yy > ey1 + reach)
    assert far.any() and np.abs(img[:, far]).max() <= 1e-6


def test_preprocess_default_size_and_arrays(tmp_path):
    path, rect, colour = _rgb_white(tmp_path / "white")
    out = preprocess_image(path)
    assert out.shape == (3, 518, 518)
    rgba = load_image(path)
    assert rgba.shape == (90, 150, 4) and rgba.dtype == np.float32 and (rgba[..., 3] == 1).all()
    torch.testing.assert_close(preprocess_image(rgba), out, rtol=0, atol=0)
    torch.testing.assert_close(preprocess_image(rgba[..., :3], size=64), preprocess_image(path, size=64))
    # the output feeds the encoder directly
    with torch.no_grad():
        assert load_image_encoder("tiny")(preprocess_image(path, size=98)[None]).shape == (1, 54, 64)


def _png_header_claiming(path, width, height):
    """A valid PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _bad_busy(path):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path.with_suffix(".png"))
    return path.with_suffix(".png"), "no alpha channel and no plain background; give an RGBA image"


def _bad_transparent(path):
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(path.with_suffix(".png"))
    return path.with_suffix(".png"), "fully transparent"


def _bad_truncated(path):
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(noise).save(path.with_suffix(".png"))
    data = path.with_suffix(".png").read_bytes()
    path.with_suffix(".png").write_bytes(data[: len(data) // 2])
    return path.with_suffix(".png"), "unreadable or truncated"


def _bad_not_an_image(path):
    path.with_suffix(".png").write_text("this is not a picture\n")
    return path.with_suffix(".png"), "not an image file"


def _bad_bomb(path):
    return _png_header_claiming(path.with_suffix(".png"), 9000, 9000), "larger than 64 megapixels"


def _bad_huge_bomb(path):
    # past Pillow's own limit, which refuses it while opening
    return _png_header_claiming(path.with_suffix(".png"), 30000, 30000), "decompression bomb"


def _bad_missing(path):
    return path.with_suffix(".png"), "no such image file"


BAD = {"busy-photo": _bad_busy, "transparent": _bad_transparent, "truncated": _bad_truncated,
       "not-an-image": _bad_not_an_image, "bomb": _bad_bomb, "huge-bomb": _bad_huge_bomb, "missing": _bad_missing}


@pytest.mark.parametrize("case", list(BAD))
def test_preprocess_refuses_with_one_line(tmp_path, case):
    path, reason = BAD[case](tmp_path / case)
    message = _one_line_error(preprocess_image, path, match=re.escape(reason))
    assert message.startswith(str(path)), message
