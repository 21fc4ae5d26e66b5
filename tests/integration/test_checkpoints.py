"""List, pull, evaluate and plot a run's checkpoints: from a local run folder and from a real S3
endpoint (moto_server on loopback) holding the same run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from boto3.s3.transfer import TransferConfig

from tests.conftest import EN_TEXT, ROOT

pytestmark = pytest.mark.slow


def distil(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distil.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})},
    )


def upload(s3, bucket: str, folder: Path, prefix: str) -> None:
    # A small multipart threshold, so that large objects arrive as multipart uploads, as from pyarrow.
    cfg = TransferConfig(multipart_threshold=256 * 1024, multipart_chunksize=256 * 1024)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}", Config=cfg)


@pytest.fixture(scope="module")
def run(trained_run):
    """One local run (checkpoints at steps 3 and 6), trained once for the session."""
    return trained_run[1]


@pytest.fixture()
def bucket(s3_endpoint, run):
    """A fresh bucket holding the run under runs/t, as a local run's folder synced to S3."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"pull-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    upload(s3, name, run, "runs/t")
    return s3, name


def test_list_local_and_s3(run, bucket, s3_endpoint):
    s3, name = bucket
    rows_metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for uri, extra in ((str(run.parent), []), (f"s3://{name}/runs", ["--endpoint-url", s3_endpoint])):
        r = distil("checkpoints", "list", uri, "--json", *extra)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(x) for x in r.stdout.splitlines()]
        assert [(x["run"], x["step"], x["complete"]) for x in rows] == [("t", 3, True), ("t", 6, True)]
        for x in rows:
            ckpt = run / f"step_{x['step']:08d}"
            assert x["tokens"] == json.loads((ckpt / "trainer_state.json").read_text())["tokens"] > 0
            assert x["size"] == sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
            logged = [m["train/loss"] for m in rows_metrics if "train/loss" in m and m["step"] <= x["step"]]
            assert x["loss"] == pytest.approx(logged[-1], rel=1e-12)
    table = distil("checkpoints", "list", f"s3://{name}/runs/t", "--endpoint-url", s3_endpoint)
    assert table.returncode == 0 and "complete" in table.stdout and "INCOMPLETE" not in table.stdout
    assert "--verify checks each file's sha256 too" in table.stdout  # (issue 26: it says what it checked)


def test_list_verify_finds_what_sizes_do_not(tmp_path, run, bucket, s3_endpoint):
    """Issue 26: `checkpoints list` checked sizes only, while a resume checks every sha256. With
    --verify it runs the same check (a local folder hashed in place, S3 read through): a flipped
    byte, at the right size, is DAMAGED there and complete without it."""
    import shutil

    s3, name = bucket
    key = f"runs/t/step_00000006/{next(p.name for p in (run / 'step_00000006').glob('*optim_states.pt'))}"
    body = bytearray(s3.get_object(Bucket=name, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket=name, Key=key, Body=bytes(body))
    local = tmp_path / "runs" / "t"
    shutil.copytree(run, local)
    shard = local / key.removeprefix("runs/t/")
    shard.write_bytes(bytes(body))
    for uri, extra in ((str(local), []), (f"s3://{name}/runs/t", ["--endpoint-url", s3_endpoint])):
        plain = [json.loads(x) for x in distil("checkpoints", "list", uri, "--json", *extra).stdout.splitlines()]
        assert [(x["step"], x["complete"], x["verified"]) for x in plain] == [(3, True, None), (6, True, None)]
        r = distil("checkpoints", "list", uri, "--json", "--verify", *extra)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(x) for x in r.stdout.splitlines()]
        assert [(x["step"], x["complete"], x["verified"]) for x in rows] == [(3, True, True), (6, False, False)]
        assert rows[1]["problem"] == f"{shard.name}: sha256 differs from the manifest"
    table = distil("checkpoints", "list", str(local), "--verify")
    assert "complete, verified" in table.stdout and f"DAMAGED: {shard.name}: sha256 differs" in table.stdout


def test_pull_from_s3_gives_the_training_weights(tmp_path, run, bucket, s3_endpoint):
    from transformers import AutoModelForMaskedLM, pipeline

    from distil.runs.export import fp32_state_dict

    s3, name = bucket
    out, cache = tmp_path / "model", tmp_path / "cache"
    r = distil(
        "checkpoints",
        "pull",
        f"s3://{name}/runs/t",
        "--out",
        str(out),
        "--endpoint-url",
        s3_endpoint,
        "--cache-dir",
        str(cache),
        "--workers",
        "4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["step"] == 6  # the result alone on stdout: DeepSpeed's lines go to stderr
    pulled = AutoModelForMaskedLM.from_pretrained(out)
    consolidated = fp32_state_dict(run / "step_00000006")
    sd = pulled.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in consolidated.items())
    ids = torch.randint(5, 100, (2, 12))
    trained = AutoModelForMaskedLM.from_pretrained(run / "model")  # what the run itself exported
    assert torch.equal(pulled(input_ids=ids).logits, trained(input_ids=ids).logits)
    fill = pipeline("fill-mask", model=str(out), top_k=3)
    assert len(fill("the [MASK] of the city")) == 3
    assert (out / "distil_config.yaml").is_file() and "testing" not in (out / "distil_config.yaml").read_text()
    assert not [p for p in cache.rglob("*") if p.is_file()]  # the staged download is removed once DIR exists
    # the model card: what was distilled, how, how long, and the held-out figures of the run's log
    from distil.runs.metrics_log import read_rows

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: fill-mask\n") and "testing" not in card
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for needle in (
        f"`{cfg['teacher']['name_or_path']}`",
        "2 layers, initialised from the teacher's layers [0, 2]",
        "KL(teacher || student) at temperature T × 5",
        "masked-LM cross-entropy × 2",
        "6 of 6 steps",
    ):
        assert needle in card, needle
    evals = {r["step"]: r for r in read_rows(run / "metrics.jsonl") if "eval/loss" in r}
    assert sorted(evals) == [0, 6]  # the last step's figures are in its checkpoint: evaluated before it was saved
    assert f"| loss | {evals[0]['eval/loss']:.4f} | {evals[6]['eval/loss']:.4f} |" in card
    probed = {r["step"]: r for r in read_rows(run / "metrics.jsonl") if "probe/retention_accuracy" in r}
    assert (
        f"| probe/retention_accuracy | {probed[0]['probe/retention_accuracy']:.4f} | "
        f"{probed[6]['probe/retention_accuracy']:.4f} |"
        in card
        and "downstream probe" in card
    )


def test_pull_raw_and_an_older_step(tmp_path, run, bucket, s3_endpoint):
    from distil.runs import layout as ckpt
    from distil.storage import integrity

    s3, name = bucket
    out = tmp_path / "raw"
    r = distil(
        "checkpoints",
        "pull",
        f"s3://{name}/runs/t",
        "--step",
        "3",
        "--raw",
        "--out",
        str(out),
        "--endpoint-url",
        s3_endpoint,
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert integrity.verify(out, ckpt.read_complete(out)["files"]) == {}
    assert ckpt.read_complete(out)["step"] == 3
    local = run / "step_00000003"
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(local) for p in local.rglob("*"))


def test_interrupted_download_resumes(tmp_path, s3_endpoint):
    """A download that fails after some chunks continues with only the missing chunks."""
    from distil.storage.download import Item, download

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"dl-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    blob = os.urandom(1_000_003)
    s3.put_object(Bucket=name, Key="big.bin", Body=blob)
    head = s3.head_object(Bucket=name, Key="big.bin")
    item = Item("big.bin", tmp_path / "big.bin", len(blob), head["ETag"])
    chunk = 64 * 1024  # 16 chunks

    class Failing:
        """The real client; its connection 'drops' (for good) after 5 chunks."""

        calls = 0

        def get_object(self, **kw):
            Failing.calls += 1
            if Failing.calls > 5:
                raise ConnectionResetError("connection reset by peer")
            return s3.get_object(**kw)

    with pytest.raises(ConnectionResetError):
        download(Failing(), name, [item], workers=1, chunk=chunk, progress=False)
    assert not item.dest.exists() and (tmp_path / "big.bin.part").is_file()
    done_before = len(json.loads((tmp_path / "big.bin.part.json").read_text())["done"])
    assert done_before == 5

    class Counting:
        ranges = []

        def get_object(self, **kw):
            Counting.ranges.append(kw["Range"])
            return s3.get_object(**kw)

    download(Counting(), name, [item], workers=3, chunk=chunk, progress=False)
    assert item.dest.read_bytes() == blob
    assert len(Counting.ranges) == 16 - 5
    assert not (tmp_path / "big.bin.part").exists() and not (tmp_path / "big.bin.part.json").exists()


def test_download_memory_is_bounded_by_chunk_times_workers(tmp_path, s3_endpoint):
    """A chunk is held only while its task runs: a 48 MiB object fetched as 1 MiB chunks on 2
    threads peaks at a few MiB of Python memory (it once kept every chunk until the end)."""
    import tracemalloc

    from distil.storage.download import Item, download

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"dl-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    blob = os.urandom(48 * 2**20)
    s3.put_object(Bucket=name, Key="big.bin", Body=blob)
    item = Item("big.bin", tmp_path / "big.bin", len(blob), s3.head_object(Bucket=name, Key="big.bin")["ETag"])
    del blob
    tracemalloc.start()
    try:
        download(s3, name, [item], workers=2, chunk=2**20, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert item.dest.stat().st_size == 48 * 2**20 and hashlib.md5(
        item.dest.read_bytes()
    ).hexdigest() == item.etag.strip('"')


def _refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.startswith("distil: error:"), r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def _nothing_written(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name != "cache"] == []


def test_bad_inputs_leave_nothing(tmp_path, run, bucket, s3_endpoint, s3_endpoint_with_auth):
    s3, name = bucket
    dest = tmp_path / "dest"
    dest.mkdir()
    out = str(dest / "model")

    def pull(uri, *extra, endpoint=s3_endpoint):
        return distil(
            "checkpoints",
            "pull",
            uri,
            "--out",
            out,
            "--endpoint-url",
            endpoint,
            "--cache-dir",
            str(dest / "cache"),
            *extra,
        )

    _refused(pull("s3://no-such-bucket-here/runs/t"), "NoSuchBucket")
    _refused(pull(f"s3://{name}/runs/t", endpoint=s3_endpoint_with_auth), "InvalidAccessKeyId", "access key")
    _refused(pull(f"s3://{name}/runs/t", "--step", "5"), "no checkpoint at step 5", "3, 6")
    _refused(pull(f"s3://{name}/runs/t", "--step", "x"), "--step")
    _refused(pull(f"s3://{name}/nothing-here"), "no checkpoints under")
    # Another run beside it: the URI must name one.
    upload(s3, name, run / "step_00000003", "runs/u/step_00000003")
    _refused(pull(f"s3://{name}/runs"), "holds 2 runs", "runs/RUN")
    # An incomplete checkpoint: its COMPLETE marker never arrived.
    s3.delete_object(Bucket=name, Key="runs/t/step_00000006/COMPLETE")
    _refused(pull(f"s3://{name}/runs/t", "--step", "6"), "incomplete", "no COMPLETE marker")
    # A truncated object (shorter than the manifest says).
    shard = "runs/t/step_00000003/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    body = s3.get_object(Bucket=name, Key=shard)["Body"].read()
    s3.put_object(Bucket=name, Key=shard, Body=body[:-100])
    _refused(pull(f"s3://{name}/runs/t", "--step", "3"), "truncated")
    # An altered object of the same size: caught by its sha256 after the download.
    s3.put_object(Bucket=name, Key=shard, Body=body[:-1] + bytes([body[-1] ^ 1]))
    _refused(pull(f"s3://{name}/runs/t", "--step", "3"), "sha256")
    _nothing_written(dest)


def test_malicious_key_is_refused(tmp_path, run, bucket, s3_endpoint):
    """A manifest naming a file outside the checkpoint folder ('..') is refused before any download."""
    s3, name = bucket
    prefix = "runs/t/step_00000006"
    complete = json.loads(s3.get_object(Bucket=name, Key=f"{prefix}/COMPLETE")["Body"].read())
    evil = "../../../../escaped.txt"
    complete["files"][evil] = {"size": 4, "sha256": "0" * 64}
    s3.put_object(Bucket=name, Key=f"{prefix}/{evil}", Body=b"evil")
    s3.put_object(Bucket=name, Key=f"{prefix}/COMPLETE", Body=json.dumps(complete).encode())
    dest = tmp_path / "dest"
    dest.mkdir()
    r = distil(
        "checkpoints",
        "pull",
        f"s3://{name}/runs/t",
        "--out",
        str(dest / "m"),
        "--endpoint-url",
        s3_endpoint,
        "--cache-dir",
        str(dest / "cache"),
    )
    _refused(r, "outside")
    assert not list(tmp_path.rglob("escaped.txt"))
    _nothing_written(dest)


def test_eval_from_another_folder_finds_every_path_the_run_named(tmp_path, run, teacher_dir):
    """Issue 26: a run's config names its teacher, data, out-of-domain text and probe relative to
    the folder it was started from; `distil eval RUN/model` from anywhere else rebases them all
    (one function), and a probe file that is missing is reported as missing."""
    import shutil

    start = tmp_path / "start"
    shutil.copytree(teacher_dir, start / "teacher")
    shutil.copy(EN_TEXT, start / "corpus.txt")
    shutil.copy(EN_TEXT, start / "ood.txt")
    shutil.copy(ROOT / "data" / "brown" / "brown_genres.tsv", start / "probe.tsv")
    model = start / "runs" / "t" / "model"
    shutil.copytree(run / "model", model)
    saved = yaml.safe_load((model / "distil_config.yaml").read_text())
    saved["teacher"]["name_or_path"] = "./teacher"
    saved["data"].update(sources=["./corpus.txt"], cache_dir=None)
    saved["eval"]["sources"] = ["./ood.txt"]
    saved["eval"]["probe"]["path"] = "./probe.tsv"
    saved["storage"]["uri"] = "runs"
    (model / "distil_config.yaml").write_text(yaml.safe_dump(saved))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = distil("eval", str(model), "--json", "--max-sequences", "16", "--probe-rows", "30", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["teacher"] == str(start / "teacher") and rep["sequences"] == 16 and rep["probe"]["rows"] == 30
    (start / "probe.tsv").unlink()
    r = distil("eval", str(model), "--max-sequences", "16", cwd=elsewhere)
    assert (
        r.returncode == 2 and "probe file probe.tsv does not exist (from " in r.stderr and "Traceback" not in r.stderr
    ), r.stderr


def test_eval_student_and_teacher(tmp_path, run, teacher_dir):
    """MLM loss equals transformers' own loss on the same masked batch; a student equal to its
    teacher has ratio 1 and agreement 1."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from distil.config.schema import load_config
    from distil.data.batches import collate
    from distil.data.masking import EVAL_STEP, Masker

    r = distil("eval", str(run / "model"), "--json", "--max-sequences", "16", "--batch-size", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["sequences"] == 16 and rep["teacher"] == str(teacher_dir)
    assert rep["loss_ratio"] == pytest.approx(rep["student_mlm"]["mlm_loss"] / rep["teacher_mlm"]["mlm_loss"])
    assert -1.0 <= rep["agreement"] <= 1.0
    # the run's probe (its config's `probe` section): the run measured the same at its last step
    probe = rep["probe"]
    assert probe["name"] == "brown_genres" and probe["rows"] == 90 and probe["folds"] == 5
    last = [
        m
        for m in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())
        if "probe/student_accuracy" in m
    ][-1]
    assert probe["student"]["accuracy"] == pytest.approx(last["probe/student_accuracy"], abs=1e-9)
    assert probe["teacher"]["accuracy"] == pytest.approx(last["probe/teacher_accuracy"], abs=1e-9)
    assert rep["retention"] == pytest.approx(
        {
            "mlm_accuracy": rep["accuracy_ratio"],
            "mlm_loss": 1 / rep["loss_ratio"],
            "probe_accuracy": probe["retention"]["accuracy"],
            "probe_macro_f1": probe["retention"]["macro_f1"],
        },
        nan_ok=True,
    )  # (a random
    # teacher may get no masked token right: its accuracy ratio is nan)
    table = distil("eval", str(run / "model"), "--max-sequences", "16", "--probe-rows", "60")
    assert table.returncode == 0, table.stderr[-3000:]
    assert "measure" in table.stdout and "retention" in table.stdout and "brown_genres accuracy" in table.stdout
    import re

    rows = re.search(
        r"probe brown_genres: \d+ classes, (\d+) rows of (\d+) groups, each predicted by one of 5", table.stdout
    )
    assert rows and int(rows.group(1)) == int(rows.group(2)) == 60, table.stdout  # one row of each of 60 texts
    refused = distil("eval", str(run / "model"), "--probe-rows", "3")
    assert refused.returncode == 2 and "--probe-rows" in refused.stderr and "Traceback" not in refused.stderr
    without = distil("eval", str(run / "model"), "--json", "--max-sequences", "16", "--no-probe")
    assert without.returncode == 0, without.stderr[-3000:]
    assert "probe" not in json.loads(without.stdout) and json.loads(without.stdout)["agreement"] == rep["agreement"]

    # The same batch, masked the same way, scored by transformers itself.
    cfg = load_config(run / "model" / "distil_config.yaml")
    from distil.data.shards import PreparedData

    tok = AutoTokenizer.from_pretrained(run / "model")
    (prepared_data,) = (Path(cfg.storage.uri) / "data").iterdir()  # what the run trained on, and held out
    held_out = PreparedData(prepared_data)["eval"]
    ids, attn = collate(held_out.rows(range(16)), tok.pad_token_id, cfg.data.max_len)
    masked, labels = Masker(cfg.masking.model_copy(update={"smoothing": None}), tok, cfg.run.seed)(
        ids, attn, EVAL_STEP, 0
    )
    with torch.no_grad():
        for who, path in (("student", run / "model"), ("teacher", teacher_dir)):
            ref = AutoModelForMaskedLM.from_pretrained(path)(input_ids=masked, attention_mask=attn, labels=labels).loss
            assert rep[f"{who}_mlm"]["mlm_loss"] == pytest.approx(float(ref), rel=1e-5), who
    assert rep["student_mlm"]["masked_tokens"] == int((labels != -100).sum())

    same = distil(
        "eval",
        str(teacher_dir),
        "--teacher",
        str(teacher_dir),
        "--data",
        str(EN_TEXT),
        "--json",
        "--max-sequences",
        "24",
    )
    assert same.returncode == 0, same.stderr[-3000:]
    rep = json.loads(same.stdout)
    assert rep["loss_ratio"] == pytest.approx(1.0) and rep["agreement"] == pytest.approx(1.0)
    # Another probe named by flags: labels a classifier can read from the words, 10 documents of 3 rows each
    table = tmp_path / "easy.csv"
    table.write_text(
        "doc,words,kind\n"
        + "".join(
            f"d{i},{' '.join([w] * 6)} {i},{w}\n"
            for i in range(10)
            for w in ("the jury said", "the city of")[i % 2 : i % 2 + 1]
            for _ in range(3)
        )
    )
    probe = distil(
        "eval",
        str(teacher_dir),
        "--teacher",
        str(teacher_dir),
        "--data",
        str(EN_TEXT),
        "--json",
        "--max-sequences",
        "24",
        "--probe",
        str(table),
        "--text-column",
        "words",
        "--label-column",
        "kind",
        "--group-column",
        "doc",
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    rep = json.loads(probe.stdout)
    assert rep["probe"]["teacher"] == {"accuracy": 1.0, "macro_f1": 1.0} and rep["probe"]["groups"] == 10
    assert rep["retention"]["probe_accuracy"] == 1.0  # the same embeddings, the same classifier


def test_plot_and_tensorboard(tmp_path, run, bucket, s3_endpoint):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s3, name = bucket
    png = tmp_path / "run.png"
    r = distil("plot", f"s3://{name}/runs/t", "--out", str(png), "--endpoint-url", s3_endpoint)
    assert r.returncode == 0, r.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in ("train/loss", "train/kl", "eval/loss", "lr", "tokens_per_s"):
        assert k in r.stdout, k
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    events = {e.step: e.value for e in acc.Scalars("train/loss")}
    logged = {m["step"]: m["train/loss"] for m in rows if "train/loss" in m}
    assert logged and events.keys() == logged.keys()
    assert all(events[s] == pytest.approx(v, rel=1e-6) for s, v in logged.items())
    assert "checkpoint/upload_s" in acc.Tags()["scalars"]
