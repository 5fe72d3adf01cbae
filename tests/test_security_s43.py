"""A security review of the API as deployed (the forty-third session): what a client can make the API write in its
log. A request refused for its Origin, or for the name it reached the API under, is logged with its path, which
Starlette gives percent-decoded: a `%0A` there ended the warning's line and began a line of the client's own making,
an unauthenticated forgery of any log entry in the text format (the default)."""

import requests

from test_origin_s29 import FOREIGN, app_origin_api  # noqa: F401 - a module fixture

FORGED = "2030-01-01 00:00:00,000 | ERROR | llava_queue.api | forged"


def test_a_refused_requests_path_cannot_begin_a_line_of_the_log(app_origin_api):  # noqa: F811
    stack = app_origin_api
    path = "/v1/jobs%0A" + requests.utils.quote(FORGED)
    assert requests.post(f"{stack.base_url}{path}", headers={"Origin": FOREIGN}, timeout=10).status_code == 403
    # Reached over loopback under a name not this machine's (DNS rebinding): refused for the name, path logged too.
    assert requests.get(f"{stack.base_url}{path}", headers={"Host": "rebound.example"}, timeout=10).status_code == 403
    lines = (stack.log_dir / "api.log").read_text().splitlines()
    assert not [line for line in lines if line.startswith(FORGED)]
    refusals = [line for line in lines if "/v1/jobs%0A" in line and "| WARNING | llava_queue.api | refused" in line]
    assert len(refusals) == 2, lines[-10:]


def test_a_line_break_in_any_logged_text_cannot_begin_a_line_of_the_log():
    # The same forgery through any message that quotes a client's text (a job id, a name, a header): the text format
    # puts what follows a line break on an indented line, and shows other breaks escaped.
    import logging

    from shared.logs import TextFormatter

    for brk in ("\n", "\r", "\r\n", "\u2028", "\x0b"):
        record = logging.LogRecord("llava_queue.api", logging.WARNING, __file__, 1, "refused %s", (f"x{brk}{FORGED}",),
                                   None)
        text = TextFormatter().format(record)
        assert not [line for line in text.splitlines() if line.startswith(FORGED)], repr(text)
        assert FORGED in text
