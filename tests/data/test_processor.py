"""Image preprocessing and prompt ids against HF's Qwen2VLImageProcessorPil + Qwen2_5_VLProcessor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ilvr_jax.data import processor as P
from ilvr_jax.tiny import build_tokenizer, image_processor_config

MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28
CFG = P.ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def hf_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def hf_processor(tokenizer):
    """Qwen2_5_VLProcessor on the slow image processor (no video processor: torchvision is absent)."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(
        image_processor=hf_image_processor(), tokenizer=tokenizer, video_processor=None,
        chat_template=tokenizer.chat_template,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def random_image(h, w, mode="RGB", seed=0):
    rng = np.random.RandomState(seed + h * 1000 + w)
    if mode == "L":
        return Image.fromarray(rng.randint(0, 256, (h, w), dtype=np.uint8), "L")
    ch = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.randint(0, 256, (h, w, ch), dtype=np.uint8), mode)


# (height, width): tiny (< min_pixels), odd aspect, above max_pixels, exact multiples of 28,
# a rounding-half case and a tall strip.
SIZES = [(10, 12), (37, 301), (301, 37), (640, 480), (56, 84), (112, 112), (42, 70), (900, 30)]


@pytest.mark.parametrize("hw", SIZES)
def test_smart_resize_matches_hf(hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    h, w = hw
    assert P.smart_resize(h, w, 28, MIN_PIXELS, MAX_PIXELS) == hf_smart_resize(
        h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_pixels_and_grid_match_hf(hw, mode):
    h, w = hw
    img = random_image(h, w, mode)
    ref = hf_image_processor()(images=[img], return_tensors="np")
    pv, grid = P.preprocess_image(img, CFG)
    assert grid == tuple(int(x) for x in ref["image_grid_thw"][0])
    assert pv.dtype == np.float32 and pv.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(pv, ref["pixel_values"], rtol=0, atol=1e-6)
    t, gh, gw = grid
    rh, rw = gh * 14, gw * 14
    assert rh % 28 == 0 and rw % 28 == 0
    assert MIN_PIXELS <= rh * rw <= MAX_PIXELS
    assert P.image_grid_thw(h, w, CFG) == grid


def test_patch_layout_by_hand():
    """An independent transcription of the layout: row r of the patches is merge group
    (r // 4), position (r % 4) = (mr, mc) within it; the row is (C, T, 14, 14) flattened."""
    img = random_image(56, 84)
    pv, (t, gh, gw) = P.preprocess_image(img, CFG)
    x = np.asarray(img.resize((84, 56), Image.Resampling.BICUBIC), np.float64) / 255.0
    x = ((x - np.asarray(P.CLIP_MEAN)) / np.asarray(P.CLIP_STD)).astype(np.float32)
    rows = []
    for bh in range(gh // 2):
        for bw in range(gw // 2):
            for mr in range(2):
                for mc in range(2):
                    r0, c0 = (2 * bh + mr) * 14, (2 * bw + mc) * 14
                    patch = x[r0:r0 + 14, c0:c0 + 14, :].transpose(2, 0, 1)  # [C, 14, 14]
                    rows.append(np.stack([patch, patch], axis=1).reshape(-1))  # [C, T, 14, 14]
    np.testing.assert_allclose(pv, np.stack(rows), atol=1e-5)


def test_multi_image_concat_matches_hf():
    imgs = [random_image(37, 301), random_image(10, 12), random_image(640, 480)]
    ref = hf_image_processor()(images=imgs, return_tensors="np")
    pv, grids = P.preprocess_images(imgs, CFG)
    np.testing.assert_array_equal(grids, ref["image_grid_thw"])
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-6, rtol=0)
    pv0, g0 = P.preprocess_images([], CFG)
    assert pv0.shape == (0, CFG.patch_dim) and g0.shape == (0, 3)


def test_config_from_hf(tmp_path):
    import json

    d = image_processor_config(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    cfg = P.ImageProcessorConfig.from_hf(tmp_path)
    assert cfg == CFG
    assert cfg.patch_dim == 1176
    legacy = {"min_pixels": 100 * 28 * 28, "max_pixels": 200 * 28 * 28}
    assert P.ImageProcessorConfig.from_hf(legacy).max_pixels == 200 * 28 * 28


# preprocessor_config.json pixel budgets: top-level keys and size set to different values,
# one of each, neither, and nulls. Budgets: 8 / 64 (top level) vs 4 / 256 (size), x 28*28.
_TOP = {"min_pixels": 8 * 28 * 28, "max_pixels": 64 * 28 * 28}
_SIZE = {"shortest_edge": 4 * 28 * 28, "longest_edge": 256 * 28 * 28}
PIXEL_BUDGETS = {
    "both": dict(_TOP, size=_SIZE),
    "top_level_only": dict(_TOP),
    "size_only": dict(size=_SIZE),
    "neither": {},
    "max_over_size": dict(max_pixels=64 * 28 * 28, size=_SIZE),
    "min_over_size": dict(min_pixels=8 * 28 * 28, size=_SIZE),
    "null_size": dict(size=None, max_pixels=100 * 28 * 28),
    "null_top_level": dict(min_pixels=None, max_pixels=None, size=_SIZE),
}


def _write_processor_json(folder, extra):
    import json

    folder.mkdir()
    d = {k: v for k, v in image_processor_config().items() if k not in ("min_pixels", "max_pixels", "size")}
    (folder / "preprocessor_config.json").write_text(json.dumps({**d, **extra}))
    return folder


@pytest.mark.parametrize("name", sorted(PIXEL_BUDGETS))
def test_config_from_hf_pixel_budget_matches_hf_loader(tmp_path, name):
    """Top-level min_pixels / max_pixels override size, as transformers' loader does: the
    budget, the grids and the pixels of a small and a large image equal HF's."""
    import warnings

    from transformers import AutoImageProcessor, Qwen2VLImageProcessorPil

    folder = _write_processor_json(tmp_path / name, PIXEL_BUDGETS[name])
    cfg = P.ImageProcessorConfig.from_hf(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for hf in (AutoImageProcessor.from_pretrained(str(folder)), Qwen2VLImageProcessorPil.from_pretrained(str(folder))):
            assert (cfg.min_pixels, cfg.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
            imgs = [random_image(10, 12), random_image(640, 480)]
            ref = hf(images=imgs, return_tensors="np")
            pv, grids = P.preprocess_images(imgs, cfg)
            np.testing.assert_array_equal(grids, ref["image_grid_thw"])
            np.testing.assert_allclose(pv, ref["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [{"longest_edge": 256 * 28 * 28}, {"min_pixels": 6272, "max_pixels": 50176}])
def test_config_from_hf_without_a_budget_is_an_error(tmp_path, size):
    """A size with one bound (or legacy keys) and no top-level keys: HF fails when resizing;
    we fail when reading, naming the file."""
    import warnings

    from transformers import Qwen2VLImageProcessorPil

    folder = _write_processor_json(tmp_path / "p", {"size": size})
    with pytest.raises(ValueError, match=r"preprocessor_config.json: no pixel budget: size needs shortest_edge"):
        P.ImageProcessorConfig.from_hf(folder)
    with warnings.catch_warnings(), pytest.raises(ValueError):
        warnings.simplefilter("ignore")
        Qwen2VLImageProcessorPil.from_pretrained(str(folder))(images=[random_image(10, 12)], return_tensors="np")


@pytest.mark.parametrize("sizes", [[], [(37, 301)], [(56, 84), (10, 12)], [(640, 480), (112, 112), (42, 70)]])
def test_prompt_ids_match_hf_processor(tokenizer, sizes):
    imgs = [random_image(h, w) for h, w in sizes]
    question = "Which shape is red? A. square B. circle"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(imgs) + [{"type": "text", "text": question}]}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    if imgs:
        ref = hf_processor(tokenizer)(text=[text], images=imgs, return_tensors="np")
        grids = [tuple(int(v) for v in g) for g in P.preprocess_images(imgs, CFG)[1]]
    else:
        ref = tokenizer([text], return_tensors="np")
        grids = []
    ids = P.build_prompt_ids(tokenizer, question, grids)
    assert ids == ref["input_ids"][0].tolist()
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == sum(P.num_image_tokens(g) for g in grids)


@pytest.mark.parametrize("question", ["Compare <image> and\n<image>: which is red?", "<image>\n<image> Which?"])
def test_placeholder_prompt_ids_match_hf_processor(tokenizer, question):
    """With ``<image>`` placeholders each image's vision block stands at its placeholder: the
    reference renders images first and then moves the blocks onto the placeholders; HF's
    processor then expands the pads of image i at the i-th block."""
    imgs = [random_image(37, 301), random_image(112, 112)]
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": question}]}],
        tokenize=False, add_generation_prompt=True,
    )
    text = text.replace(block, "").replace("<image>", block)
    ref = hf_processor(tokenizer)(text=[text], images=imgs, return_tensors="np")
    grids = [tuple(int(v) for v in g) for g in P.preprocess_images(imgs, CFG)[1]]
    assert P.num_image_tokens(grids[0]) != P.num_image_tokens(grids[1])
    ids = P.build_prompt_ids(tokenizer, question, grids)
    assert ids == ref["input_ids"][0].tolist()
    # Without placeholders the same question text puts the images first: a different sequence.
    assert ids != P.build_prompt_ids(tokenizer, question.replace("<image>", ""), grids)


def test_default_pixel_budget_is_qwen25vl_checkpoint_default():
    """Qwen2.5-VL-7B-Instruct's preprocessor_config.json: min_pixels 3136, max_pixels 12845056."""
    cfg = P.ImageProcessorConfig()
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 12845056) == (4 * 28 * 28, 16384 * 28 * 28)


def test_missing_special_token_is_a_clear_error():
    tok = build_tokenizer(latent_tokens=False)
    with pytest.raises(ValueError, match="no token '<\\|latent_pad\\|>'"):
        P.special_token_id(tok, "<|latent_pad|>")


def test_expand_image_pads_counts():
    assert P.expand_image_pads([1, 9, 2, 9], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9]
    with pytest.raises(ValueError):
        P.expand_image_pads([1, 9, 2], 9, [2, 3])
    with pytest.raises(ValueError):
        P.expand_image_pads([9, 9], 9, [2])


def _smooth_image(h, w):
    """A non-square image whose rows and columns all differ (any flip or turn changes it)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(y * 255) // h, (x * 255) // w, ((x + 2 * y) * 7) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _png_with_trailing_exif(path, image, orientation):
    """A PNG whose eXIf chunk comes after the image data (PIL writes it before)."""
    import io
    import zlib

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif\x00\x00") else exif.tobytes()
    chunk = len(payload).to_bytes(4, "big") + b"eXIf" + payload + zlib.crc32(b"eXIf" + payload).to_bytes(4, "big")
    iend = data.rindex(b"IEND") - 4
    path.write_bytes(data[:iend] + chunk + data[iend:])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "PNG-trailing"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_hf_load_image(tmp_path, monkeypatch, fmt, orientation):
    """load_image turns the file upright as transformers' load_image does (same pixels, same
    processor output) and image_size gives the upright size from the header alone."""
    from PIL import ImageFile
    from transformers.image_utils import load_image as hf_load_image

    raw = _smooth_image(40, 90)
    path = tmp_path / ("img.jpg" if fmt == "JPEG" else "img.png")
    if fmt == "PNG-trailing":
        _png_with_trailing_exif(path, raw, orientation)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        raw.save(path, format=fmt, exif=exif)
    with Image.open(path) as im:
        assert im.size == (90, 40)
        assert Image.Image.getexif(im).get(0x0112) == (None if fmt == "PNG-trailing" else orientation)

    ours, ref = P.load_image(str(path)), hf_load_image(str(path))
    assert ours.mode == "RGB" and ours.size == ref.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    assert ref.size == ((40, 90) if orientation >= 5 else (90, 40))  # the tag was honoured
    pv, grid = P.preprocess_image(ours, CFG)
    out = hf_image_processor()(images=[ref], return_tensors="np")
    assert grid == tuple(int(x) for x in out["image_grid_thw"][0])
    np.testing.assert_allclose(pv, out["pixel_values"], rtol=0, atol=1e-6)

    def no_decoding(self, *a, **k):
        raise AssertionError("image_size decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert P.image_size(str(path)) == (ours.size[1], ours.size[0])
    assert P.image_grid_thw(*P.image_size(str(path)), CFG) == grid
