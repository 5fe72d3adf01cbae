"""A LLaVA question file's refused line whose question_id JSON cannot hold as a number (1e400 reads as infinity)
is written to the errors file with a null question_id: it was written as `Infinity`, and the whole errors file was
then JSON that strict parsers (jq, JavaScript's, Go's) refuse."""

import json

import requests

from test_batches import upload_batch, wait_for_batch


def strict(text: str) -> list[dict]:
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


def test_an_errors_file_is_json_whatever_the_question_id(stack):
    content = b'{"question_id": 1e400, "text": "hi"}\n{"question_id": -1e400}\n{"question_id": 3, "text": "hi"}\n'
    batch = upload_batch(stack, content, max_new_tokens=2, temperature=0)
    done = wait_for_batch(stack, batch["id"])
    assert done["request_counts"] == {"total": 3, "completed": 1, "failed": 2}, done
    for path in (f"/v1/batches/{batch['id']}/errors", f"/v1/files/{done['error_file_id']}/content"):
        response = requests.get(f"{stack.base_url}{path}", timeout=30)
        assert response.status_code == 200, response.text
        errors = strict(response.text)
        assert [(error["line"], error["question_id"]) for error in errors] == [(1, None), (2, None)], errors
