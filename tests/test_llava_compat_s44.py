"""Prompts of one, two and three turns, with and without an image, rendered by the original `llava/conversation.py`
(of `llava-torch==1.2.2.post1`, run as it is) and by shared.conversation: the golden file holds one and two turns."""

import importlib.util
import itertools

from shared.conversation import get_template, render_messages
from test_controller import llava_dir  # noqa: F401 (fixture)

# A plain turn, one with a literal <image> inside, an empty one (the original skips it), one with spaces to strip.
TEXTS = ["What is this?", "a <image> b", "", "  Hi  "]


def original_module(folder, name: str):
    spec = importlib.util.spec_from_file_location(f"original_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompt_or_error(render) -> str | None:
    """The prompt, or None where rendering fails (the original raises AssertionError or TypeError, ours ValueError)."""
    try:
        return render()
    except (AssertionError, TypeError, ValueError):
        return None


def test_every_template_renders_up_to_three_turns_as_the_original(llava_dir):  # noqa: F811
    original = original_module(llava_dir, "conversation")
    compared = 0
    for name, template in original.conv_templates.items():
        stop = template.sep if template.sep_style.name in ("SINGLE", "MPT") else template.sep2  # the web server's
        assert get_template(name).stop == stop, name
        for turns, image in itertools.product((1, 2, 3), (False, True)):
            for texts in itertools.product(TEXTS, repeat=2 * turns - 1):
                theirs, ours = template.copy(), get_template(name)
                for index, text in enumerate(texts):
                    role = theirs.roles[index % 2]
                    with_image = image and index == 0
                    # The original's image turn is a (text, image, mode) tuple; rendering never reads the image.
                    theirs.append_message(role, (text, None, "Default") if with_image else text)
                    ours.append_message(role, text, int(with_image))
                theirs.append_message(theirs.roles[1], None)
                ours.append_message(ours.roles[1], None)
                expected = prompt_or_error(theirs.get_prompt)
                assert prompt_or_error(ours.get_prompt) == expected, (name, texts, image)
                if all(texts[::2]) and expected is not None:
                    # Chat turns as the API takes them: the web server's first image turn gets "\n<image>" appended.
                    chat = [{"role": "assistant" if index % 2 else "user", "text": text,
                             "images": int(image and index == 0)} for index, text in enumerate(texts)]
                    if image and "<image>" not in texts[0]:
                        theirs.messages[theirs.offset][1] = (texts[0] + "\n<image>", None, "Default")
                        expected = theirs.get_prompt()
                    assert render_messages(name, chat) == (expected, stop), (name, texts, image)
                compared += 1
    assert compared > 10_000
