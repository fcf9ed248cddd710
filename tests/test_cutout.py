"""Background removal in-process: fidelity to rembg, options, layout, presets and compliance."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsvc.errors import InvalidInput
from imgsvc.models.background.remover import BackgroundRemover
from imgsvc.operations.cutout import options as opt
from imgsvc.operations.cutout.layout import place
from imgsvc.operations.cutout.pipeline import remove_background
from imgsvc.operations.cutout.presets import PRESETS, Preset, check
from imgsvc.operations.cutout.spec import CutoutSpec
from tests.utils import DATA


def skimage_photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def real_photos() -> dict[str, Image.Image]:
    """Real photos, small for speed: rembg's examples and scikit-image's bundled photos."""
    photos = {n: Image.open(DATA / f"{n}.jpg").convert("RGB") for n in ("car", "cloth")}
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        photo = skimage_photo(name)
        photo.thumbnail((320, 320), Image.Resampling.LANCZOS)
        photos[name] = photo
    return photos


@pytest.fixture(scope="module")
def engine(repo_weights: Path) -> BackgroundRemover:
    return BackgroundRemover(
        "u2netp", repo_weights / "rembg" / "u2netp.onnx", device="cpu", strict=False, threads=1
    )


@pytest.fixture(scope="module")
def rembg_session(repo_weights: Path) -> object:
    import os

    os.environ["U2NET_HOME"] = str(repo_weights / "rembg")  # never download
    from rembg import new_session

    return new_session("u2netp")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a >= 128, b >= 128
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("name", ["car", "cloth", "chelsea", "coffee", "astronaut", "rocket"])
def test_alpha_matches_rembg(engine: BackgroundRemover, rembg_session: object, name: str) -> None:
    from rembg import remove

    photo = real_photos()[name]
    expected = np.asarray(remove(photo, session=rembg_session, only_mask=True))
    result = remove_background(engine, photo, CutoutSpec())
    ours = np.asarray(Image.open(io.BytesIO(result.body)).getchannel("A"))
    assert ours.shape == expected.shape
    assert _iou(ours, expected) >= 0.99
    assert np.abs(ours.astype(int) - expected).max() <= 1


def test_cutout_keeps_visible_colours_and_clears_the_rest(engine: BackgroundRemover) -> None:
    photo = real_photos()["car"]
    before = np.asarray(photo).copy()
    result = remove_background(engine, photo, CutoutSpec())
    out = np.asarray(Image.open(io.BytesIO(result.body)))
    visible = out[..., 3] > 0
    assert 0 < visible.mean() < 1
    assert np.array_equal(out[visible, :3], before[visible])  # the photo's own colours
    assert not out[~visible].any()  # fully transparent pixels carry no colour
    assert np.array_equal(np.asarray(photo), before)  # the input image is left untouched


def test_version_is_the_manifest_sha256_prefix(engine: BackgroundRemover) -> None:
    assert engine.version == "309c8469258d"
    # the fidelity tests above compare masks from this rewritten graph with rembg's own session
    assert engine.resize_nodes_rewritten == 38


def test_post_process_and_decontaminate_follow_rembg(
    engine: BackgroundRemover, rembg_session: object
) -> None:
    from rembg import remove

    photo = real_photos()["car"]
    expected = np.asarray(
        remove(photo, session=rembg_session, only_mask=True, post_process_mask=True)
    )
    assert np.array_equal(np.asarray(engine.mask(photo, post_process=True)), expected)
    mask = engine.mask(photo)
    plain = np.asarray(engine.cutout(photo, mask))
    clean = np.asarray(engine.cutout(photo, mask, decontaminate=True))
    soft = (plain[..., 3] > 10) & (plain[..., 3] < 245)
    assert np.array_equal(plain[..., 3], clean[..., 3])  # same matte…
    assert np.abs(plain[soft, :3].astype(int) - clean[soft, :3]).mean() > 1  # …new edge colours


def test_empty_mask_is_flagged(engine: BackgroundRemover) -> None:
    result = remove_background(engine, Image.new("RGB", (120, 90), "white"), CutoutSpec())
    assert result.warning is not None and result.warning.startswith("empty_mask")
    assert result.coverage < 0.005


def test_roi_limits_the_subject(engine: BackgroundRemover) -> None:
    photo = real_photos()["car"]
    result = remove_background(engine, photo, CutoutSpec(roi=(0, 0, 240, 360)))
    alpha = np.asarray(Image.open(io.BytesIO(result.body)).getchannel("A"))
    assert alpha[:, 240:].max() == 0 and alpha[:, :240].max() > 200


def test_option_parsing() -> None:
    assert opt.parse_color("81d4fa") == (0x81, 0xD4, 0xFA, 255)
    assert opt.parse_color("#81d4fa80") == (0x81, 0xD4, 0xFA, 0x80)
    assert opt.parse_color("white") == (255, 255, 255, 255)
    margin = opt.parse_margin("10px 20%")
    assert margin.resolve(100, 50) == (10, 20, 10, 20)
    assert opt.parse_roi("10% 0 50% 100%", 200, 100) == (20, 0, 100, 100)
    assert opt.parse_scale("original") is None and opt.parse_scale("50%") == 0.5
    assert opt.parse_position("center") == (0.5, 0.5)
    assert opt.parse_position("0% 100%") == (0.0, 1.0)
    assert opt.parse_size("regular") == "preview" and opt.parse_size("4k") == "full"
    for bad in (
        lambda: opt.parse_color("not-a-colour"),
        lambda: opt.parse_margin("60%"),
        lambda: opt.parse_margin("501px"),
        lambda: opt.parse_roi("50% 0 10% 100%", 200, 100),
        lambda: opt.parse_scale("5%"),
        lambda: opt.parse_position("left"),
        lambda: opt.parse_size("huge"),
    ):
        with pytest.raises(InvalidInput):
            bad()


def _subject(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    img = Image.new("RGBA", size, (0, 0, 0, 0))
    img.paste((200, 30, 30, 255), box)
    return img


def test_layout_crop_scale_position() -> None:
    cut = _subject((200, 100), (50, 20, 90, 60))  # a 40x40 subject
    cropped = place(cut, CutoutSpec(crop=True, margin=opt.parse_margin("10px")))
    assert cropped.image.size == (60, 60) and cropped.subject_box == (10, 10, 50, 50)
    scaled = place(cut, CutoutSpec(scale=0.5))
    assert scaled.subject_box == (75, 25, 125, 75)  # 50 % of the 100 px height, centred
    corner = place(cut, CutoutSpec(position=(1.0, 1.0)))
    assert corner.subject_box == (160, 60, 200, 100)


def _preset_options(preset: Preset, **changes: object) -> CutoutSpec:
    base = {
        "scale": preset.fill,
        "position": (0.5, 0.5),
        "canvas": preset.canvas,
        "bg_color": preset.background,
        "format": preset.format,
        "preset": preset,
    }
    return CutoutSpec(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_pass_their_own_check(engine: BackgroundRemover, name: str) -> None:
    preset = PRESETS[name]
    for photo_name in ("car", "cloth"):
        result = remove_background(engine, real_photos()[photo_name], _preset_options(preset))
        assert result.compliance == [], (photo_name, result.compliance)
        assert result.size == preset.canvas


def test_bad_layouts_fail_the_check(engine: BackgroundRemover) -> None:
    amazon = PRESETS["amazon"]
    photo = real_photos()["car"]
    small = {"scale": 0.5, "position": (0.0, 0.0)}
    result = remove_background(engine, photo, _preset_options(amazon, **small))
    assert result.compliance is not None
    assert "fill_0.50_below_0.85" in result.compliance and "not_centred" in result.compliance
    grey = remove_background(engine, photo, _preset_options(amazon, bg_color=(240, 240, 240, 255)))
    assert grey.compliance == ["background_not_pure_white"]
    png = remove_background(engine, photo, _preset_options(PRESETS["etsy"], format="webp"))
    assert png.compliance == ["format_webp_not_accepted"]


def test_check_reads_the_file_it_judges() -> None:
    shopify = PRESETS["shopify"]
    buf = io.BytesIO()
    _subject((2048, 2048), (200, 200, 1848, 1848)).save(buf, "PNG")
    assert check(shopify, buf.getvalue(), (200, 200, 1848, 1848)) == []
    buf = io.BytesIO()
    _subject((2048, 1024), (200, 100, 1848, 924)).convert("RGB").save(buf, "JPEG")
    reasons = check(shopify, buf.getvalue(), (200, 100, 1848, 924))
    assert "aspect_not_1:1" in reasons and "background_not_transparent" in reasons


def test_zip_and_alpha_channel(engine: BackgroundRemover) -> None:
    photo = real_photos()["car"]
    result = remove_background(engine, photo, CutoutSpec(format="zip"))
    with zipfile.ZipFile(io.BytesIO(result.body)) as zf:
        assert sorted(zf.namelist()) == ["alpha.png", "color.jpg"]
        alpha = Image.open(io.BytesIO(zf.read("alpha.png")))
        assert alpha.mode == "L" and alpha.size == photo.size
    matte = remove_background(engine, photo, CutoutSpec(channels="alpha"))
    assert Image.open(io.BytesIO(matte.body)).mode == "L"


def test_preview_is_at_most_a_quarter_megapixel(engine: BackgroundRemover) -> None:
    photo = skimage_photo("astronaut")  # 512x512
    result = remove_background(engine, photo, CutoutSpec(size="preview"))
    w, h = result.size
    assert w * h <= 250_000 and abs(w - h) <= 1
