"""Decoding an image counts against the worker's budget of pixels being prepared (a review of the thirty-eighth session:
each task thread decoded its image before taking the budget, and held it while waiting for it; concurrent jobs of one
277 KB PNG of 7000x7000 each took the worker's peak memory up by 3.1 GB for 6 jobs, 5.4 GB for 12)."""

import io
import threading
import time

import pytest
from PIL import Image

from llava_fixtures import b64
from shared.settings import get_settings
from workers import images
from workers.images import PREPARED_PIXELS_FACTOR, PREPARING, load_pixel_values

JOBS = 8
SIDE = 1000


@pytest.fixture
def megapixel_limit(monkeypatch):
    """LLAVA_QUEUE_MAX_IMAGE_PIXELS of one million: a budget of four million pixels being prepared."""
    monkeypatch.setenv("LLAVA_QUEUE_MAX_IMAGE_PIXELS", str(SIDE * SIDE))
    get_settings.cache_clear()
    yield PREPARED_PIXELS_FACTOR * SIDE * SIDE
    monkeypatch.undo()
    get_settings.cache_clear()


class Counting:
    """The image processor, counting an image's decoded pixels in flight until it has read them."""

    def __init__(self, processor):
        self.processor = processor
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.mine = {}

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, *args, **kwargs):
        try:
            return self.processor(*args, **kwargs)
        finally:
            with self.lock:
                self.in_flight -= self.mine.pop(threading.get_ident())

    def decoding(self, pixels: int) -> None:
        with self.lock:
            self.mine[threading.get_ident()] = pixels
            self.in_flight += pixels
            self.most = max(self.most, self.in_flight)


def test_concurrent_jobs_decode_their_images_within_the_prepared_pixel_budget(megapixel_limit, monkeypatch):
    from transformers import CLIPImageProcessor

    processor = Counting(CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}))
    real_open = images.open_image

    def opening(data, index=0, **limits):
        image = real_open(data, index, **limits)
        real_load, counted = image.load, []

        def load():
            if not counted:
                counted.append(True)
                # The file's pixels and the RGB copy decoding makes of them; a pause lets other jobs catch up.
                processor.decoding(2 * image.width * image.height)
                time.sleep(0.2)
            return real_load()

        image.load = load
        return image

    monkeypatch.setattr(images, "open_image", opening)
    buffer = io.BytesIO()
    Image.new("RGBA", (SIDE, SIDE), (10, 20, 30, 255)).save(buffer, "PNG")
    data = b64(buffer.getvalue())
    results, failures = [], []

    def job():
        try:
            results.append(load_pixel_values([data], processor, "pad"))
        except Exception as exc:  # noqa: BLE001 - said by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=job) for _ in range(JOBS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures and len(results) == JOBS
    assert all(result.shape == (1, 3, 56, 56) for result in results)
    assert processor.in_flight == 0 and PREPARING.held == 0
    # Two images of a million pixels, each decoded twice over, fill the budget of four million.
    assert processor.most <= megapixel_limit, f"{processor.most} decoded pixels in flight; the budget is " \
                                              f"{megapixel_limit}"
