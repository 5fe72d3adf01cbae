"""A cancellation broadcast heard while a job's prompt and images are prepared, before its request reaches the
engine: the job leaves the engine before its prefill (workers.generation.JobRunner.cancel). The engine dropped the
abort of a request it did not have yet, so the job was prefilled (a long prompt's chunks for seconds on a CPU) and
went on until its first chunk found the record cancelled."""


def test_a_cancel_heard_while_a_job_is_prepared_stops_it_before_its_prefill(redis_server, default_model_dir,
                                                                             monkeypatch):
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest
    from shared.settings import Settings
    from workers import generation
    from workers.builder import load_model, serving_engine

    store = JobStore.from_url(redis_server.url, prefix="early-cancel")
    loaded = load_model(str(default_model_dir), device="cpu", dtype="float32")
    runner = generation.JobRunner(store, loaded, "w1")
    engine = serving_engine(loaded, Settings(), on_step=runner.publish)
    runner.attach(engine)
    engine.start()
    real_prepare = generation.prepare
    job_ids = []

    def prepare_then_cancel(request, loaded, cap):
        prepared = real_prepare(request, loaded, cap)
        if len(job_ids) == 1:
            # The client's DELETE: the record asks the job to stop, and the worker's listener hands the broadcast to
            # the runner, now, before the engine has the job.
            store.cancel(job_ids[0])
            runner.cancel(job_ids[0])
        return prepared

    monkeypatch.setattr(generation, "prepare", prepare_then_cancel)
    try:
        job_ids.append(store.create(GenerateRequest(prompt="Tell me a long story.", max_new_tokens=64),
                                    "interactive")[0])
        assert runner.run(job_ids[0]) == "cancelled"
        record = store.get(job_ids[0])
        assert record["status"] == "cancelled" and record["completion_tokens"] == 0, record
        # The next job, not cancelled, runs as ever.
        job_ids.append(store.create(GenerateRequest(prompt="Hi", temperature=0, max_new_tokens=4), "interactive")[0])
        assert runner.run(job_ids[1]) == "succeeded"
        assert store.get(job_ids[1])["completion_tokens"] >= 1
    finally:
        engine.shutdown()
