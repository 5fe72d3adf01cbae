"""Chat turns for a LLaVA model whose `<image>` count cannot match their images are refused at submission.

The worker renders the turns with the original's template and then applies the original's rule (one image per
`<image>` of the prompt); a job that breaks it was accepted (202) and then failed there. The API renders the same
turns when it validates them, so it refuses them at once, in the worker's words.
"""

import pytest
from llava_fixtures import png_b64
from pydantic import ValidationError

from shared.protocol import GenerateRequest, InvalidRequest, parse_request

LLAVA = "llava-v1.5-13b"
IMAGE = png_b64(40, 30, seed=3)


def test_a_literal_image_token_in_a_text_only_turn_is_refused_at_submission():
    turns = [{"role": "user", "text": "What does <image> mean in HTML?"}]
    with pytest.raises(ValidationError, match=r"Number of images does not match .* \(0 images, 1 <image>\)"):
        GenerateRequest(model=LLAVA, messages=turns)
    # A model whose name lacks "llava" reads no images (the original's rule): its `<image>` is text.
    GenerateRequest(model="SmolLM2-135M-Instruct", messages=turns)


def test_a_later_turn_naming_two_images_for_its_one_is_refused_with_the_workers_words():
    turns = [{"role": "user", "text": "Hi"}, {"role": "assistant", "text": "Hello."},
             {"role": "user", "text": "Is <image> brighter than <image>?", "images": [IMAGE]}]
    with pytest.raises(InvalidRequest) as refused:
        parse_request({"model": LLAVA, "messages": turns})
    assert refused.value.status == 422
    assert refused.value.message == \
        "Number of images does not match number of <image> tokens in prompt (1 image, 2 <image>)"
    # With one <image> for its one image (the first turn's moved to the front, a later one's appended when its text
    # names none) the turns are taken.
    GenerateRequest(model=LLAVA, messages=[
        {"role": "user", "text": "What is it?", "images": [IMAGE]}, {"role": "assistant", "text": "A cat."},
        {"role": "user", "text": "And this one?", "images": [IMAGE]}])
