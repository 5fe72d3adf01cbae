"""Images the API let through that the worker could not read or that cost the API past its budget (a fuzzing pass of
the forty-second session): an EPS opened (202) and failed its job, "Unable to locate Ghostscript"; an ICO's image,
which PIL decodes while it opens the file, was decoded outside the submission's CHECK_DECODE_PIXELS."""

import base64
import io
import struct
import time

import pytest
from PIL import Image
from pydantic import ValidationError

from shared.protocol import CHECK_DECODE_PIXELS, BulkJobRequest, GenerateRequest, open_image
from test_fuzz_s42 import ico_holding
from test_request_bounds_s38 import png_without_end


def job(image: bytes) -> dict:
    return {"model": "llava-v1.5-7b", "prompt": "<image>\nWhat is this?", "images": [base64.b64encode(image).decode()],
            "max_new_tokens": 1}


def saved(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, image_format)
    return buffer.getvalue()


def test_a_format_pil_reads_only_with_another_program_is_refused_at_submission():
    # A placeable metafile's header of 16x16 (PIL draws one only on Windows), an MPEG sequence's (PIL has no decoder).
    wmf = b"\xd7\xcd\xc6\x9a\0\0" + struct.pack("<hhhhH", 0, 0, 16, 16, 72) + bytes(6) + b"\1\0\t\0" + bytes(18)
    mpeg = b"\0\0\1\xb3" + struct.pack(">I", 16 << 20 | 16 << 8) + bytes(32)
    for image_format, image in (("EPS", saved("EPS")), ("WMF", wmf), ("MPEG", mpeg)):
        with pytest.raises(ValidationError, match=f"image 0 is not a readable image file: its format, {image_format}, "
                                                  "is not read"):
            GenerateRequest.model_validate(job(image))
        # The worker reads images the same way: the job of one sent past the API fails naming it, as before, but so.
        with pytest.raises(ValueError, match=image_format):
            open_image(base64.b64encode(image).decode())
    # Formats PIL decodes by itself are read as before.
    for image_format in ("PNG", "JPEG", "WEBP", "GIF", "TGA", "ICO"):
        GenerateRequest.model_validate(job(saved(image_format)))


SIDE = 7000  # an ICO holding a 7000x7000 PNG, within the pixel limit: two fit in the budget, a third does not
assert 2 * SIDE * SIDE <= CHECK_DECODE_PIXELS < 3 * SIDE * SIDE


def test_an_icos_image_is_decoded_at_submission_within_the_budget_only():
    raw = base64.b64decode(png_without_end(SIDE, SIDE))
    whole = ico_holding(raw)  # PIL decodes its PNG (no end chunk: the decoder reads it) to open it
    cut = ico_holding(raw[:len(raw) // 2])  # its PNG cut in its data: opening it fails
    with pytest.raises(ValidationError, match="image 0 is not a readable image file"):
        GenerateRequest.model_validate(job(cut))
    started = time.process_time()
    bulk = BulkJobRequest.model_validate({"jobs": [job(whole)] * 2 + [job(cut)] * 6})
    # The cut ones are past the budget: not decoded here, left to the worker (which fails their jobs, naming them).
    assert len(bulk.jobs) == 8
    assert time.process_time() - started < 10  # two decoded, not eight (generously, for a loaded machine)
    # Within the budget a cut one is still refused.
    with pytest.raises(ValidationError, match="image 0 is not a readable image file"):
        BulkJobRequest.model_validate({"jobs": [job(cut), job(whole)]})
