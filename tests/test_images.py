"""Images from request to pixels: decoding with limits, the original's process modes and pad-to-square."""

import base64
import io
import struct

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, LlavaImageProcessor

from llava_fixtures import b64, png_bytes, png_claiming_size, png_with_corrupt_pixels
from shared.protocol import GenerateRequest, check_images, open_image
from workers.images import (PAGE_PAD_COLOUR, apply_process_mode, decode_image, expand_to_square, load_pixel_values,
                            mean_colour)


def encoded(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return b64(buffer.getvalue())


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})


def test_plain_base64_a_data_url_and_wrapped_lines_decode_alike():
    data = b64(png_bytes(30, 20, seed=1))
    wrapped = "\n".join(data[i:i + 76] for i in range(0, len(data), 76))
    images = [decode_image(form) for form in (data, f"data:image/png;base64,{data}", wrapped)]
    assert all(image.size == (30, 20) and image.mode == "RGB" for image in images)
    assert images[0].tobytes() == images[1].tobytes() == images[2].tobytes()
    # The API takes the data: URL too (the original took only plain base64).
    GenerateRequest(prompt="<image>", images=[f"data:image/png;base64,{data}"])


@pytest.mark.parametrize(("data", "message"), [
    ("not base64!", "image 0 is not valid base64"),
    (b64(b"Just a text file, not an image.\n"), "image 0 is not an image file"),
    (b64(png_bytes(40, 30)[:300]), "image 0 (is not a readable image file|could not be decoded): .*[Tt]runcated"),
    (b64(png_claiming_size(9000, 9000)), "image 0 is too large: 9000x9000 = 81000000 pixels; the limit is 50000000"),
    (b64(png_claiming_size(100_000, 100_000)), "image 0 is too large"),
    ("data:image/png,rawbytes", "not base64"),
    # PIL raises NotImplementedError for a DDS file of a pixel format it does not know: a 500 at the API before.
    (b64(b"DDS " + struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44)
         + struct.pack("<2I4s5I", 32, 4, b"ABCD", 0, 0, 0, 0, 0) + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + bytes(64)),
     "image 0 is not a readable image file: NotImplementedError: Unimplemented pixel format"),
    ("", "image 0 is empty"),
])
def test_bad_images_are_refused_at_submission_with_a_clear_message(data, message):
    with pytest.raises(ValueError, match=message):
        check_images([data])
    with pytest.raises(ValueError, match=message):
        decode_image(data)


def png_variants() -> dict[str, bytes]:
    """A whole PNG, and the same without its end chunk (IEND) or with its data chunk's (IDAT) checksum wrong."""
    good = png_bytes(40, 30, seed=7)
    at = good.index(b"IDAT")
    crc_at = at + 4 + int.from_bytes(good[at - 4:at], "big")
    return {"no IEND": good[:-12],
            "bad IDAT checksum": good[:crc_at] + bytes(b ^ 0xFF for b in good[crc_at:crc_at + 4]) + good[crc_at + 4:]}


@pytest.mark.parametrize("name", ["no IEND", "bad IDAT checksum"])
def test_a_file_pils_decoder_reads_is_taken_though_its_structure_is_off(name):
    # The original decodes these (Image.open, then RGB): the API's structure check (verify) refused them with a 422.
    data = png_variants()[name]
    original = Image.open(io.BytesIO(data)).convert("RGB")
    check_images([b64(data)])
    decoded = decode_image(b64(data))
    assert decoded.size == (40, 30) and decoded.tobytes() == original.tobytes()


def test_the_image_limit_is_per_request_not_per_turn():
    image = b64(png_bytes(8, 8))
    turns = [{"role": "user", "text": "<image>" * 8, "images": [image] * 8} for _ in range(2)]
    GenerateRequest(messages=turns)  # 16 in all: the limit
    with pytest.raises(ValueError, match="17 images in the turns; the limit is 16 per request"):
        GenerateRequest(messages=[*turns, {"role": "user", "text": "<image>", "images": [image]}])
    with pytest.raises(ValueError, match="17 images; the limit is 16 per request"):
        GenerateRequest(prompt="<image>" * 17, images=[image] * 17)


def test_the_pixel_limit_is_read_from_the_header_before_decoding():
    bomb = b64(png_claiming_size(5000, 5000))  # a few hundred bytes that claim 25 million pixels
    assert len(bomb) < 1000
    with pytest.raises(ValueError, match="image 3 is too large: 5000x5000"):
        open_image(bomb, 3, max_pixels=1_000_000)
    with pytest.raises(ValueError, match="image 0 is 8 bytes of base64; the limit is 4"):
        open_image("aGVsbG8=", max_bytes=4)


def test_pixel_data_only_the_worker_decodes_fails_there_with_a_clear_message():
    data = b64(png_with_corrupt_pixels())
    check_images([data])  # the file's structure is sound: the API accepts it
    with pytest.raises(ValueError, match="image 2 could not be decoded: .*broken data stream"):
        decode_image(data, 2)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_mode_decodes_to_rgb(mode):
    image = Image.new("RGB", (12, 7), (10, 200, 30)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode_image(encoded(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (12, 7)


def test_expand_to_square_centres_the_image_on_the_background():
    wide = expand_to_square(Image.new("RGB", (10, 4), (255, 0, 0)), (1, 2, 3))
    assert wide.size == (10, 10)
    assert wide.getpixel((0, 2)) == (1, 2, 3) and wide.getpixel((0, 3)) == (255, 0, 0)  # pasted at y = (10 - 4) // 2
    assert wide.getpixel((9, 6)) == (255, 0, 0) and wide.getpixel((9, 7)) == (1, 2, 3)
    tall = expand_to_square(Image.new("RGB", (3, 10), (255, 0, 0)), (1, 2, 3))
    assert tall.getpixel((2, 0)) == (1, 2, 3) and tall.getpixel((3, 0)) == (255, 0, 0)  # x = (10 - 3) // 2
    square = Image.new("RGB", (5, 5))
    assert expand_to_square(square, (0, 0, 0)) is square


def test_the_pad_colour_is_the_processor_mean(processor):
    assert mean_colour(processor) == (122, 116, 104) == PAGE_PAD_COLOUR


@pytest.mark.parametrize(("size", "mode", "expected"), [
    ((4000, 3000), "Default", (896, 672)),
    ((3000, 4000), "Crop", (672, 896)),
    ((1920, 1080), "Default", (1194, 672)),
    ((1345, 1000), "Default", (903, 672)),
    ((2000, 2000), "Default", (672, 672)),
    ((5000, 1000), "Default", (1340, 268)),
    ((1344, 1000), "Default", (1344, 1000)),
    ((640, 480), "Resize", (336, 336)),
    ((640, 480), "Pad", (640, 640)),
    ((2000, 1000), "Pad", (672, 672)),
])
def test_process_modes_and_the_longest_side_limit_match_the_original_page(size, mode, expected):
    assert apply_process_mode(Image.new("RGB", size), mode).size == expected


def test_pad_mode_fills_with_the_pages_colour():
    padded = apply_process_mode(Image.new("RGB", (20, 10), (0, 0, 0)), "Pad")
    assert padded.getpixel((0, 0)) == PAGE_PAD_COLOUR and padded.getpixel((10, 10)) == (0, 0, 0)


def test_an_unknown_process_mode_is_refused():
    with pytest.raises(ValueError, match="image_process_mode must be one of Crop, Resize, Pad, Default"):
        apply_process_mode(Image.new("RGB", (4, 4)), "Stretch")
    with pytest.raises(ValueError):
        GenerateRequest(prompt="<image>", images=[b64(png_bytes(4, 4))], image_process_mode="Stretch")


def test_pixel_values_with_and_without_padding(processor):
    wide, square = b64(png_bytes(80, 40, seed=2)), b64(png_bytes(60, 60, seed=3))
    padded = load_pixel_values([wide, square], processor, "pad")
    cropped = load_pixel_values([wide, square], processor, None)
    assert padded.shape == cropped.shape == (2, 3, 56, 56)
    # "pad" = the original's expand2square with the mean colour, then the processor.
    expected = processor(expand_to_square(decode_image(wide), (122, 116, 104)), return_tensors="pt")["pixel_values"]
    assert torch.equal(padded[0], expected[0])
    assert not torch.equal(padded[0], cropped[0])
    # A square image is the same either way.
    assert torch.equal(padded[1], cropped[1])


def test_a_bad_image_among_good_ones_is_named(processor):
    good = b64(png_bytes(20, 20))
    with pytest.raises(ValueError, match="image 1 could not be decoded"):
        load_pixel_values([good, b64(png_with_corrupt_pixels()), good], processor, "pad")


@pytest.fixture
def small_pixel_limit(monkeypatch):
    """A request pixel limit of 1,000,000 (so prepared images may reach 4,000,000 pixels)."""
    from shared.settings import get_settings

    monkeypatch.setenv("LLAVA_QUEUE_MAX_IMAGE_PIXELS", "1000000")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_a_long_thin_image_fails_its_job_instead_of_growing_to_gigabytes(processor, small_pixel_limit):
    """A few-hundred-byte PNG within the pixel limit must not become a huge image on its way to the crop: the
    processor's resize of the shorter side (8000x5 → 89600x56) or the "pad" square (3000x100 → 3000x3000) would.
    With the default limits the same happens to a 50000x1 image at 336 px (336x16800000: the worker is killed)."""
    thin = encoded(Image.new("RGB", (8000, 5), (200, 10, 10)))
    with pytest.raises(ValueError, match=r"image 1 is too long and thin to prepare: 8000x5 is resized by the image "
                                         r"processor to 89600x56 = 5017600 pixels; the limit is 4000000"):
        load_pixel_values([b64(png_bytes(20, 20)), thin], processor, None)
    tall = encoded(Image.new("RGB", (5, 8000)))
    with pytest.raises(ValueError, match="image 0 .* 5x8000 is resized by the image processor to 56x89600"):
        load_pixel_values([tall], processor, None)
    banner = encoded(Image.new("RGB", (3000, 100)))
    with pytest.raises(ValueError, match="image 0 .* 3000x100 padded to a square is 3000x3000 = 9000000 pixels"):
        load_pixel_values([banner], processor, "pad")
    with pytest.raises(ValueError, match="image 0 .* 3000x100 padded to a square is 3000x3000"):
        load_pixel_values([banner], processor, None, "Pad")
    llava_hf = LlavaImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_pad=True)
    with pytest.raises(ValueError, match="image 0 .* 3000x100 padded to a square is 3000x3000"):
        load_pixel_values([banner], llava_hf, None)
    # Within the limit, as before: padded, the banner is one 3000x3000 image no longer; "Default" shrinks it first.
    assert load_pixel_values([banner], processor, None).shape == (1, 3, 56, 56)
    assert load_pixel_values([banner], processor, "pad", "Default").shape == (1, 3, 56, 56)
    assert load_pixel_values([encoded(Image.new("RGB", (1200, 800)))], processor, "pad").shape == (1, 3, 56, 56)


def test_a_pixel_limit_above_pils_own_is_honoured():
    """LLAVA_QUEUE_MAX_IMAGE_PIXELS=200000000 must take a 180-million-pixel image (PIL alone refuses it, saying it
    is over 200 million) and refuse one over 200 million with the real size."""
    limit = 200_000_000
    with open_image(b64(png_claiming_size(15_000, 12_000)), max_pixels=limit) as image:
        assert image.size == (15_000, 12_000)
    with pytest.raises(ValueError, match="image 0 is too large: 20000x12000 = 240000000 pixels; the limit is 2000"):
        open_image(b64(png_claiming_size(20_000, 12_000)), max_pixels=limit)


@pytest.mark.parametrize("mode", ["Default", "Crop"])
def test_an_image_the_pages_size_limit_would_shrink_to_nothing_fails_with_its_name(processor, mode):
    """Past an aspect of 1344:1 the page's limit shrinks the short side to 0 pixels (the original page failed there
    too): the job's error names the image, not PIL's bare "height and width must be > 0"."""
    needle = encoded(Image.new("RGB", (3, 5000)))
    with pytest.raises(ValueError, match=r"image 1 is too long and thin for the page's 1344-pixel limit: 3x5000 "
                                         r"would shrink to 0x0"):
        load_pixel_values([b64(png_bytes(20, 20)), needle], processor, "pad", mode)
    # "Pad" squares it first, and a process mode of None leaves it to the processor: both still work.
    assert load_pixel_values([needle], processor, "pad", "Pad").shape == (1, 3, 56, 56)


def test_sixteen_bit_grey_is_read_as_the_original_reads_it(processor):
    """PIL's convert("RGB") saturates 16-bit grey at 255 (1000 and 65535 both become white): the original's CLIP
    processor converted so, and transformers' does, so it is kept; only the original's "pad" differed, failing on
    any one-band image (expand2square's Image.new takes no RGB colour for it), where ours pads the RGB image."""
    grey = Image.frombytes("I;16", (4, 2), struct.pack("<8H", 0, 100, 255, 256, 1000, 30000, 65535, 7))
    data = encoded(grey)
    original = processor(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), return_tensors="pt")
    assert torch.equal(load_pixel_values([data], processor, None), original["pixel_values"])
    assert decode_image(data).getpixel((0, 1)) == (255, 255, 255)  # 1000
    with pytest.raises(TypeError):  # the original's expand2square on it
        Image.new(grey.mode, (4, 4), PAGE_PAD_COLOUR)
    padded = processor(expand_to_square(decode_image(data), (122, 116, 104)), return_tensors="pt")["pixel_values"]
    assert torch.equal(load_pixel_values([data], processor, "pad"), padded)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
def test_pad_reads_any_mode_as_its_rgb_image(processor, mode):
    """The original's expand2square works in the image's own mode: it failed on L and LA, and filled P and CMYK
    canvases with the wrong colour (a fresh palette; CMYK ink). Ours pads the RGB image, so every mode pads alike."""
    rgb = Image.new("RGB", (30, 12), (10, 200, 30))
    image = rgb.convert(mode)
    data = encoded(image, "JPEG" if mode == "CMYK" else "PNG")
    expected = load_pixel_values([encoded(decode_image(data))], processor, "pad", "Pad")
    assert torch.equal(load_pixel_values([data], processor, "pad", "Pad"), expected)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animation_is_read_at_its_first_frame_as_the_original_reads_it(fmt):
    frames = [Image.new("RGB", (30, 20), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    red, green, blue = decode_image(b64(buffer.getvalue())).getpixel((5, 5))
    assert red > 200 and blue < 50


def test_exif_orientation_is_not_applied_as_the_original_does_not():
    """The original worker read the pixels as stored (Image.open, then the processor): a camera's rotated JPEG
    reaches the model unrotated there, and so here, for the same answers."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 120, 0)).save(buffer, format="JPEG", exif=exif.tobytes())
    assert decode_image(b64(buffer.getvalue())).size == (40, 20)
