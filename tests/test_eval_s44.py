"""`llava-queue eval --script model_vqa_mmbench`, what the forty-fourth session found: its jobs file named the run's
--image-folder (by default the current folder), though mmbench reads its images from its TSV."""

import json
import uuid

from test_eval_mmbench_s43 import mmbench_argv, write_tsv
from test_eval_s30 import eval_in_process, jobs_with
from test_eval_s41 import read_lines, stop_with_jobs_in_flight


def test_an_mmbench_rerun_from_another_folder_collects_the_jobs_in_the_queue(tiny_llava_stack, tmp_path, capsys,
                                                                            monkeypatch):
    # mmbench.sh gives no --image-folder: run again from another folder, every job in the queue was "submitted with
    # other parameters", not collected, and its question asked a second time.
    for older in (False, True):
        marker = f" [{uuid.uuid4().hex[:8]}]"
        folder = tmp_path / uuid.uuid4().hex[:6]
        (folder / "elsewhere").mkdir(parents=True)
        write_tsv(folder / "mmbench.tsv", marker)
        answers, jobs_file = folder / "a.jsonl", folder / "a.jsonl.jobs"
        argv = mmbench_argv(tiny_llava_stack, folder, answers, "--all-rounds", "--max_new_tokens", "48",
                            "--max-in-flight", "4")
        stop_with_jobs_in_flight(argv, jobs_file)
        if older:
            # A jobs file of the version before, which named the image folder (where that run was started).
            records = [json.loads(line) for line in jobs_file.read_text().splitlines()]
            for record in records:
                if "params" in record:
                    record["params"]["image_folder"] = str(folder)
            jobs_file.write_text("".join(json.dumps(record) + "\n" for record in records))
        capsys.readouterr()
        with monkeypatch.context() as patch:
            patch.chdir(folder / "elsewhere")
            assert eval_in_process(argv) == 1  # the row without its image fails
        captured = capsys.readouterr()
        assert "other parameters" not in captured.out + captured.err, captured
        assert " 0 collected" not in captured.out, captured.out
        assert len(read_lines(answers)) == 9 and jobs_with(tiny_llava_stack, marker) == 9
