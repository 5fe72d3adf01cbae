"""From the base64 images of a request to the pixel tensors a vision tower reads.

Three steps, as in the original stack: an optional process mode (what the original web page
does before sending: Pad, Resize, Crop, Default, then its longest-side limit), the checkpoint's
`image_aspect_ratio` ("pad": expand to a square filled with the image processor's mean colour),
then the model's own image processor (resize, center-crop, normalize).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from PIL import Image

from shared.protocol import open_image
from shared.settings import get_settings

PROCESS_MODES = ("Crop", "Resize", "Pad", "Default")
# The original page pads with this colour (CLIP's mean, rounded as it rounds it) and sizes.
PAGE_PAD_COLOUR = (122, 116, 104)
PAGE_RESIZE = (336, 336)
PAGE_MAX_LEN = 1344
PAGE_MIN_LEN = 672
# An image on its way to the processor's crop may grow (a square canvas for "pad", the processor's resize of the
# shorter side) to at most this many times the request pixel limit: a long, thin image of a few hundred bytes would
# otherwise ask for gigabytes (a 50000x1 PNG resized to 336 high: 336x16800000) and bring the worker down.
PREPARED_PIXELS_FACTOR = 4
# Decoding an image holds its pixels twice: as the file decodes to, and their RGB copy.
DECODED_COPIES = 2


def decode_image(data: str, index: int = 0, keep_alpha: bool = False) -> Image.Image:
    """Decode one image of a request to an RGB PIL image; ValueError (naming the image) when it cannot be.

    The byte and pixel limits are checked before any pixel is decoded (`shared.protocol.open_image`,
    the same check the API makes at submission). With `keep_alpha`, an image with transparency is RGBA
    instead, for an image processor that reads transparency itself (transformers' composites it onto white).
    """
    with open_image(data, index) as image:
        return _decoded(image, index, keep_alpha)


def _decoded(image: Image.Image, index: int, keep_alpha: bool) -> Image.Image:
    """The pixels of `image`, opened by `open_image`, as `decode_image` returns them."""
    try:
        image.load()
        # The first frame of an animation; RGB as the original's CLIP processor read it (alpha dropped,
        # palettes expanded; 16-bit grey saturates at 255, as there).
        return image.convert("RGBA" if keep_alpha and has_alpha(image) else "RGB")
    except Exception as exc:  # noqa: BLE001 - as in open_image: whatever a decoder raises on a crafted file
        raise ValueError(f"image {index} could not be decoded: {type(exc).__name__}: {exc}") from None


def has_alpha(image: Image.Image) -> bool:
    """Whether `image` has transparency: an alpha band, or a transparent colour (palette or tRNS)."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """The image centred on a square canvas of its longer side, filled with `background` (expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def apply_process_mode(image: Image.Image, mode: str, index: int = 0) -> Image.Image:
    """What the original web page does to an image before sending it, for process mode `mode`.

    Pad: expand to a square (background (122, 116, 104)); Resize: 336x336; Crop and Default:
    unchanged (the model's processor crops). Then, when the longer side exceeds 1344, shrink so
    the shorter side is min(1344 / aspect, 672, shorter side), keeping the aspect ratio. ValueError naming
    image `index` when that leaves no pixel (an aspect over 1344: the original page failed on it too).
    """
    if mode == "Pad":
        image = expand_to_square(image, PAGE_PAD_COLOUR)
    elif mode == "Resize":
        image = image.resize(PAGE_RESIZE)
    elif mode not in ("Default", "Crop"):
        raise ValueError(f"image_process_mode must be one of {', '.join(PROCESS_MODES)}, got {mode!r}")
    width, height = image.size
    if max(width, height) > PAGE_MAX_LEN:
        aspect = max(width, height) / min(width, height)
        short = int(min(PAGE_MAX_LEN / aspect, PAGE_MIN_LEN, min(width, height)))
        long = int(short * aspect)
        size = (short, long) if height > width else (long, short)
        if short < 1:
            raise ValueError(f"image {index} is too long and thin for the page's {PAGE_MAX_LEN}-pixel limit: "
                             f"{width}x{height} would shrink to {size[0]}x{size[1]}")
        image = image.resize(size)
    return image


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's mean pixel as 0-255 RGB, the colour the original pads with ((122, 116, 104) for CLIP)."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


def _processor_resize(size: tuple[int, int], image_processor) -> tuple[int, int] | None:
    """The size the processor resizes an image of `size` to before cropping, when it resizes its shorter side."""
    target = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", True) or target is None:
        return None
    edge = target.get("shortest_edge") if isinstance(target, dict) else getattr(target, "shortest_edge", None)
    if not edge:
        return None
    width, height = size
    short, long = min(width, height), max(width, height)
    long = int(edge * long / short)  # transformers' get_resize_output_image_size
    return (edge, long) if width <= height else (long, edge)


def _check_growth(index: int, size: tuple[int, int], grown: tuple[int, int] | None, how: str) -> None:
    """ValueError naming the image when preparing it would make an image over the prepared-pixel limit."""
    if grown is None:
        return
    limit = PREPARED_PIXELS_FACTOR * get_settings().max_image_pixels
    pixels = grown[0] * grown[1]
    if pixels > limit:
        raise ValueError(f"image {index} is too long and thin to prepare: {size[0]}x{size[1]} {how} "
                         f"{grown[0]}x{grown[1]} = {pixels} pixels; the limit is {limit}")


def _square(size: tuple[int, int]) -> tuple[int, int]:
    return (max(size), max(size))


class PixelBudget:
    """The pixels that the images being prepared on the worker's task threads may take at once.

    Within its limit each image is prepared as before; past it, an image waits for the others to be done. A long,
    thin image of a hundred bytes padded to a square takes up to the prepared-pixel limit (200 M pixels by default,
    about 3.6 GB on its way through the processor); several at once, one a job in a batch of jobs, took the worker's
    memory with them.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.held = 0

    @contextmanager
    def hold(self, pixels: int, limit: int) -> Iterator[None]:
        pixels = min(pixels, limit)  # one over the limit alone is refused before it grows (_check_growth)
        with self._changed:
            self._changed.wait_for(lambda: self.held + pixels <= limit)
            self.held += pixels
        try:
            yield
        finally:
            with self._changed:
                self.held -= pixels
                self._changed.notify_all()


PREPARING = PixelBudget()


def _peak_pixels(size: tuple[int, int], image_processor, image_aspect_ratio: str | None,
                 process_mode: str | None) -> int:
    """The most pixels an image of `size` takes while it is prepared: itself, its square when it is padded to one,
    the processor's resize of either."""
    shapes = [size]
    if process_mode == "Pad" or image_aspect_ratio == "pad" or getattr(image_processor, "do_pad", False):
        shapes.append(_square(size))
    shapes += [resized for resized in (_processor_resize(shape, image_processor) for shape in shapes) if resized]
    return max(width * height for width, height in shapes)


def _prepare_image(image: Image.Image, image_processor, image_aspect_ratio: str | None, process_mode: str | None,
                   index: int) -> torch.Tensor:
    if process_mode == "Pad":
        _check_growth(index, image.size, _square(image.size), "padded to a square is")
    if process_mode is not None:
        image = apply_process_mode(image, process_mode, index)
    if image_aspect_ratio == "pad":
        _check_growth(index, image.size, _square(image.size), "padded to a square is")
        image = expand_to_square(image, mean_colour(image_processor))
    if getattr(image_processor, "do_pad", False) and hasattr(image_processor, "pad_to_square"):
        # llava-hf's LlavaImageProcessor with do_pad: the same square, made by the processor.
        _check_growth(index, image.size, _square(image.size), "padded to a square is")
    _check_growth(index, image.size, _processor_resize(image.size, image_processor),
                  "is resized by the image processor to")
    return image_processor(image, return_tensors="pt")["pixel_values"][0]


def load_pixel_values(images: list[str], image_processor, image_aspect_ratio: str | None,
                      process_mode: str | None = None, keep_alpha: bool = False) -> torch.Tensor:
    """Decode and prepare every image of a request → pixel values [N, 3, S, S].

    One image at a time, so only one full-size decoded image is held at once. Raises ValueError
    naming the first image that cannot be used. `keep_alpha`: see `decode_image`.
    """
    return torch.stack([_load_image(data, index, image_processor, image_aspect_ratio, process_mode, keep_alpha)
                        for index, data in enumerate(images)])


def _load_image(data: str, index: int, image_processor, image_aspect_ratio: str | None, process_mode: str | None,
                keep_alpha: bool) -> torch.Tensor:
    """One image of a request decoded and prepared within the `PREPARING` budget, its hold sized from the file's
    header. Decoded before the hold, a 277 KB PNG of 7000x7000 held 0.5 GB while it waited, and a dozen such jobs
    at once took 5 GB past the budget. An icon's hold is sized from its image's own header and taken before the file
    opens: PIL decodes an ICO's image as it opens it (a 50 M-pixel ICO, 200 MB, was decoded before its hold), and an
    ICNS's at its own size, not the directory's (a "16x16" ICNS decoded its image in a hold sized for 16x16)."""
    limit = PREPARED_PIXELS_FACTOR * get_settings().max_image_pixels
    holds = []
    with ExitStack() as held:
        def hold(size: tuple[int, int]) -> None:
            peak = max(DECODED_COPIES * size[0] * size[1],
                       _peak_pixels(size, image_processor, image_aspect_ratio, process_mode))
            held.enter_context(PREPARING.hold(peak, limit))
            holds.append(peak)

        opened = open_image(data, index, before_decode=hold)  # other files: their header only, no pixel decoded
        try:
            if not holds:
                hold(opened.size)
            image = _decoded(opened, index, keep_alpha)
        finally:
            opened.close()  # its pixels as decoded, before the RGB copy is prepared (leaving `with` keeps them)
        return _prepare_image(image, image_processor, image_aspect_ratio, process_mode, index)
