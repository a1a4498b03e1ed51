"""What someone running the job unattended meets: a broken run never looks green, mistakes are caught
before the cluster starts and end as one line with a documented exit code, progress says how far and
how long, and the log is ours, not Ray Data's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import pytest
from cli_process import one_error_line, run_cli, with_signal
from corpus import jsonl_bytes, make_docs, parquet_bytes
from object_stores import free_port

import pipeline
from pipeline.cli import build_parser, main
from pipeline.config import load_config
from pipeline.errors import EXIT_OK, IncompleteRunError, SettingsError, StorageAccessError
from pipeline.io.layout import ERRORS, PARTS, RUN_RECORD
from pipeline.verify import verify_output


@pytest.fixture()
def corpus(tmp_path):
    (tmp_path / "in").mkdir()
    for shard in range(3):
        (tmp_path / "in" / f"part-{shard}.jsonl").write_bytes(
            jsonl_bytes(make_docs(40, seed=shard, prefix=f"o{shard}"))
        )
    return tmp_path / "in"


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if the job gets as far as connecting to Ray."""
    import pipeline.job

    def connect_ray(config):
        raise AssertionError("the job reached Ray: the mistake should have been caught before")

    monkeypatch.setattr(pipeline.job, "connect_ray", connect_ray)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_text_field_the_input_lacks_is_refused_before_ray_with_the_fields_it_has(
    tmp_path, tiny_checkpoint, no_ray, capsys, fmt
):
    (tmp_path / "in").mkdir()
    docs = [{"id": d["id"], "body": d["text"]} for d in make_docs(20, seed=1, prefix="f")]
    data = jsonl_bytes(docs) if fmt == "jsonl" else parquet_bytes(docs)
    (tmp_path / "in" / f"a.{fmt}").write_bytes(data)
    code = main(["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_checkpoint)])
    assert code == SettingsError.exit_code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--text-field 'text'" in line and "['id', 'body']" in line and "set --text-field" in line
    assert not (tmp_path / "out").exists(), "nothing is written, so nothing is pinned"


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--device", "gpu"], "'gpu' is not one of auto, cpu, cuda, cuda:N"),
        (["--device", "cuda"], "needs GPUs: set actors.gpus_per_actor"),
        (["--device", "cpu", "--gpus-per-actor", "1"], "never uses the 1 GPUs per actor"),
        (["--attention", "flash_attn"], "attention flash_attn runs on CUDA GPUs"),
        (["--gpus-per-actor", "1", "--dtype", "float32", "--attention", "varlen"], "not on cuda in float32"),
    ],
)
def test_device_settings_that_cannot_work_are_refused_before_ray(
    corpus, tmp_path, tiny_checkpoint, no_ray, capsys, flags, says
):
    code = main(["embed", str(corpus), str(tmp_path / "out"), "--model", str(tiny_checkpoint), *flags])
    assert code == SettingsError.exit_code
    assert says in one_error_line(capsys.readouterr().err)


def test_actors_a_local_ray_cannot_place_are_refused_and_a_cluster_is_given_time(ray_local, caplog):
    from pipeline.ray_session import check_actors_fit

    gpu = load_config(None, {"input": "x", "output": "y", "actors": {"gpus_per_actor": 1}})
    with pytest.raises(SettingsError, match="1 embedding actors need 1 GPU, but this machine's local Ray has 0"):
        check_actors_fit(gpu, local=True)
    wide = load_config(None, {"input": "x", "output": "y", "actors": {"cpus_per_actor": 2}})
    with pytest.raises(SettingsError, match="need 2 CPU and 1 CPU to read, but this machine's local Ray has 2"):
        check_actors_fit(wide, local=True)
    check_actors_fit(gpu, local=False)  # an autoscaler may still add GPU nodes: a warning, not an error
    assert "waits for the autoscaler" in caplog.text


def test_a_local_gpu_job_on_a_machine_without_gpus_ends_at_once_in_one_line(corpus, tmp_path, tiny_checkpoint):
    result = run_cli(
        "embed", str(corpus), str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--gpus-per-actor", "1"
    )
    assert result.returncode == SettingsError.exit_code, result.stderr[-3000:]
    assert "need 1 GPU, but this machine's local Ray has 0" in one_error_line(result.stderr)


def test_a_run_that_embeds_nothing_fails_and_a_corrected_run_takes_over_the_output(
    ray_local, tmp_path, tiny_checkpoint, capsys
):
    # Every row has an empty "text" and its words under "body": the first shard's fields look right.
    (tmp_path / "in").mkdir()
    docs = [{"id": d["id"], "text": " ", "body": d["text"]} for d in make_docs(30, seed=2, prefix="e")]
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(docs))
    out = tmp_path / "out"
    args = ["embed", str(tmp_path / "in"), str(out), "--model", str(tiny_checkpoint), "--id-field", "id"]
    for ceiling in ("0.05", "1"):  # no ceiling on dead letters makes a run that embedded nothing a success
        assert main([*args, "--max-error-rate", ceiling]) == IncompleteRunError.exit_code == 8
        captured = capsys.readouterr()
        line = one_error_line(captured.err)
        assert "nothing was embedded: all 30 input rows were dead-lettered" in line
        assert "empty_text: the text is empty or only whitespace" in line and "a.jsonl row 0" in line
        assert "dead letters   30 rows (100.00%)" in captured.out
    report = verify_output(str(out))
    assert any("nothing is embedded" in p for p in report.problems)

    # No embedding was ever committed, so the output is not pinned to the settings that failed.
    assert main([*args, "--text-field", "body"]) == EXIT_OK
    assert json.loads((out / RUN_RECORD).read_text())["settings"]["text_field"] == "body"
    assert not (out / ERRORS).exists() and pq.read_table(out / PARTS).num_rows == 30
    assert verify_output(str(out)).ok


def test_settings_are_pinned_by_the_first_committed_embedding_not_before(tmp_path):
    from pipeline.config import StorageConfig
    from pipeline.io.manifest import CommitRecord, OutputState
    from pipeline.io.run_record import PINNED_SETTINGS, SettingsMismatchError, open_run_record, read_run_record
    from pipeline.io.shards import Shard
    from pipeline.io.storage import filesystem_for

    fs, root = filesystem_for(str(tmp_path / "out"), StorageConfig())
    shards = [Shard("file:///in/a.jsonl", "a.jsonl", "jsonl", 10, "size=10")]
    settings = {**dict.fromkeys(PINNED_SETTINGS), "model_weights_sha256": "w", "pooling": "cls"}
    open_run_record(fs, root, settings, OutputState())
    mean = {**settings, "pooling": "mean"}
    # A run that committed nothing, or only dead letters, does not pin its settings.
    dead_letters_only = OutputState(commits=[CommitRecord("p1", 3, {shards[0].url: [(0, 3)]}, 0, {"empty_text": 3})])
    record, state = open_run_record(fs, root, mean, dead_letters_only)
    assert record["settings"]["pooling"] == "mean" and state.commits == []
    assert read_run_record(fs, root)["settings"]["pooling"] == "mean"
    embedded = OutputState(commits=[CommitRecord("p2", 3, {shards[0].url: [(0, 3)]}, 0, {"empty_text": 1})])
    with pytest.raises(SettingsMismatchError, match="pooling: stored 'mean', now 'cls'"):
        open_run_record(fs, root, settings, embedded)


def test_missing_s3_credentials_end_in_one_line_that_says_what_was_tried(s3, s3_endpoint, tmp_path, tiny_checkpoint):
    s3.pipe(f"{s3.bucket}/in/a.jsonl", jsonl_bytes(make_docs(3, seed=3, prefix="c")))
    no_credentials = {
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    result = run_cli(
        "embed", f"s3://{s3.bucket}/in/", str(tmp_path / "out"), "--model", str(tiny_checkpoint),
        "--endpoint-url", s3_endpoint, env=no_credentials, timeout_s=60,
    )  # fmt: skip
    assert result.returncode == StorageAccessError.exit_code == 9
    line = one_error_line(result.stderr)
    assert "no usable S3 credentials" in line and "AWS_ACCESS_KEY_ID" in line and "--anon" in line


def test_a_relative_output_under_ray_job_submit_is_refused(corpus, tiny_checkpoint, no_ray, monkeypatch, capsys):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` sets for its entrypoint
    monkeypatch.chdir(corpus.parent)
    assert main(["embed", str(corpus), "relative/out", "--model", str(tiny_checkpoint)]) == SettingsError.exit_code
    line = one_error_line(capsys.readouterr().err)
    assert "OUTPUT 'relative/out' is a relative path" in line and "ray job submit" in line
    assert not (corpus.parent / "relative").exists()


def test_the_log_shows_our_progress_not_ray_datas(corpus, tmp_path, tiny_checkpoint):
    args = ["embed", str(corpus), str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--progress-interval", "0.5"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    progress = [line for line in result.stdout.splitlines() if line.startswith("progress: ")]
    assert progress and all(" rows" in line and "tok/s, ETA" in line for line in progress)
    assert re.fullmatch(r"progress: 120 of 120 rows \(100%\), [\d,]+ tokens, [\d,]+ tok/s, ETA 0s", progress[-1])
    everything = result.stdout + result.stderr
    assert "logging_progress" not in everything and "Execution plan" not in everything
    assert "embedding finished" in result.stdout


@pytest.mark.slow
def test_verbose_shows_ray_datas_own_log(corpus, tmp_path, tiny_checkpoint):
    verbose = run_cli("embed", str(corpus), str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Execution plan" in verbose.stdout + verbose.stderr


def test_quiet_prints_no_progress_and_status_answers_in_json(ray_local, corpus, tmp_path, tiny_checkpoint, capsys):
    out = str(tmp_path / "out")
    args = ["embed", str(corpus), out, "--model", str(tiny_checkpoint), "--quiet", "--progress-interval", "0.1"]
    assert main(args) == EXIT_OK
    printed = capsys.readouterr().out
    assert "progress:" not in printed and "embedding finished" in printed
    assert main(["status", out, "--json"]) == EXIT_OK
    status = json.loads(capsys.readouterr().out)
    assert status["rows_committed"] == status["rows_embedded"] == 120 and status["shards_complete"] == 3
    assert status["last_run"]["documents"] == 120 and status["uncommitted_leftovers"] == 0


def test_a_ray_started_on_this_machine_is_left_alone_unless_asked_for(corpus, tmp_path, tiny_checkpoint):
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--port", str(free_port()), "--num-cpus", "1", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(ray_tmp, "ray", "ray_current_cluster")):
            assert time.monotonic() < deadline and head.poll() is None, "ray start did not come up"
            time.sleep(0.2)
        # ray.init(num_cpus=...) alone would attach to it and fail ("num_cpus ... must not be provided").
        result = run_cli(
            "embed", str(corpus), str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--num-cpus", "2",
            env={"RAY_TMPDIR": ray_tmp},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "starting a local Ray for this job with 2 CPUs; --ray-address auto joins one" in result.stderr
    finally:
        with_signal(head.pid, signal.SIGKILL)  # its whole process group: that Ray's every process, at once
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_every_embed_flag_says_what_it_does_and_the_version_is_printed(capsys):
    parser = build_parser()
    embed = next(a for a in parser._actions if a.dest == "command").choices["embed"]
    silent = [a.option_strings for a in embed._actions if a.option_strings and not a.help]
    assert silent == []
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"neobert-pipeline {pipeline.__version__}"
