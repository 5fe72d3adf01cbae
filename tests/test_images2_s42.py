"""An icon's image is decoded within the worker's budget of pixels being prepared (a review of the forty-second session:
PIL decodes an ICO's image while it opens the file, and the worker opened it before taking its hold, so each ICO of up
to the pixel limit, 200 MB, was decoded past the budget; an ICNS's hold was sized from its directory's size, not its
image's)."""

import io
import threading

import pytest
import torch
from PIL import Image

from llava_fixtures import b64, png_claiming_size
from shared.settings import get_settings
from test_fuzz_s42 import icns_holding, ico_holding
from workers.images import PREPARED_PIXELS_FACTOR, PREPARING, load_pixel_values


@pytest.mark.parametrize("holding", [ico_holding, icns_holding])
def test_an_icon_is_decoded_only_once_its_image_holds_the_prepared_pixel_budget(holding):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    limit = PREPARED_PIXELS_FACTOR * get_settings().max_image_pixels
    # Its PNG claims 2000x2000 (8 M pixels decoded twice over) and cannot be decoded: its failure says it was decoded.
    icon = b64(holding(png_claiming_size(2000, 2000)))
    failures = []

    def load():
        try:
            load_pixel_values([icon], processor, None)
        except ValueError as exc:
            failures.append(str(exc))

    thread = threading.Thread(target=load)
    with PREPARING.hold(limit - 1_000_000, limit):  # other images hold all but a million pixels
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and not failures, failures  # it waits, undecoded
    thread.join(30)
    assert len(failures) == 1 and failures[0].startswith("image 0 could not be decoded" if holding is icns_holding
                                                         else "image 0 is not a readable image file"), failures
    assert PREPARING.held == 0


def test_an_ico_as_icons_are_reads_as_the_image_it_holds():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    image = Image.new("RGBA", (48, 48), (200, 30, 30, 255))
    ico_file, png_file = io.BytesIO(), io.BytesIO()
    image.save(ico_file, "ICO", sizes=[(16, 16), (48, 48)])
    image.save(png_file, "PNG")
    assert torch.equal(load_pixel_values([b64(ico_file.getvalue())], processor, "pad"),
                       load_pixel_values([b64(png_file.getvalue())], processor, "pad"))
    assert PREPARING.held == 0
