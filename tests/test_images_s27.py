"""The pixels the worker's task threads prepare at once are bounded (a probe of the twenty-seventh session: two jobs
of 2.8 KB, each 16 copies of a 14000x1 PNG padded to squares, took the worker to 5.7 GB)."""

import threading

from llava_fixtures import png_b64
from shared.settings import get_settings
from workers.images import PREPARED_PIXELS_FACTOR, PREPARING, _peak_pixels, load_pixel_values


def test_a_large_image_waits_while_others_hold_the_prepared_pixel_budget(tiny_llava_family):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(tiny_llava_family.clip_tower)
    limit = PREPARED_PIXELS_FACTOR * get_settings().max_image_pixels
    assert _peak_pixels((4000, 1), processor, "pad", None) == 4000 * 4000  # its square
    assert _peak_pixels((4000, 1), processor, None, "Pad") == 4000 * 4000
    assert _peak_pixels((30, 20), processor, None, None) == 84 * 56  # the processor's resize, to 56 high
    prepared = []
    thread = threading.Thread(target=lambda: prepared.append(load_pixel_values([png_b64(4000, 1)], processor, "pad")))
    with PREPARING.hold(limit - 1_000_000, limit):  # other images hold all but a million pixels
        thread.start()
        small = load_pixel_values([png_b64(30, 20)], processor, "pad")  # fits: it goes through
        thread.join(0.5)
        assert thread.is_alive() and not prepared  # the padded one waits
    thread.join(30)
    assert len(prepared) == 1 and prepared[0].shape == small.shape
    assert PREPARING.held == 0
