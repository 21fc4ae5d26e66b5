"""A run's data, tokenized once: `STORAGE/data/<fingerprint>/` (distil/data/shards.py), opened
by every rank instead of tokenized by every rank.

The first process that needs a fingerprint that is not in storage yet prepares it: reads the
sources, tokenizes, packs or splits into sequences, makes the held-out split, and writes the
shards (local storage) or writes them to a local folder and publishes them (S3: the manifest
last). Every later start -- another rank, a restarted worker group, a resumed run on new pods
-- finds the manifest and opens the shards memory-mapped (from S3 through a local cache that
fetches a shard when a sample in it is first read). A Ray run prepares on the driver, before
any worker starts, so the workers never tokenize.
"""

from __future__ import annotations

# Imports inside functions: Ray and the tokenizers' version only where data is prepared (Ray only
# with Ray).
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from distil.config.schema import DistilConfig
from distil.config.sections import is_hub_name
from distil.data import corpus, shards_s3
from distil.data import shards as ts
from distil.data.corpus import FORMATS, HubSet, Reading, hub_version, local_files, plan, read
from distil.data.sequences import HeldOut, Packer, token_ids, tokenizer_spec
from distil.data.shard_check import DamagedData, manifest_problem
from distil.errors import UserError
from distil.storage.paths import is_s3, remove_tree


def data_storage(cfg: DistilConfig, fingerprint: str | None = None):
    """Where prepared data lives: STORAGE/data/<fingerprint>, beside the runs, shared by every
    run of the same data (`distil.storage.location.Storage`)."""
    root = cfg.storage_root().child("data")
    return root.child(fingerprint) if fingerprint else root


def source_listing(cfg: DistilConfig) -> list[dict]:
    """What the fingerprint covers of the sources, in the order they are read: every file's
    name, size and mtime (local) or ETag (S3); a hub data set by its name, configuration,
    arguments, resolved commit and data files (`corpus.hub_version`)."""

    out = []
    for source in cfg.data.sources:
        if is_hub_name(source):
            out.append(
                {
                    "name": f"hub:{source}",
                    "size": 0,
                    "version": json.dumps(
                        [cfg.data.hub_config, cfg.data.hub_kwargs, hub_version(source, cfg.data)],
                        sort_keys=True,
                        default=str,
                    ),
                }
            )
        elif is_s3(source):
            storage = cfg.storage_root().elsewhere(source)
            objects = [o for o in storage.list_objects() if Path(o["key"]).suffix in FORMATS]
            if not objects:
                raise UserError(
                    f"{source} holds no {'/'.join(FORMATS)} objects",
                    where="data.sources",
                    fix="check the prefix (and the endpoint and credentials)",
                )
            out += [{"name": f"{storage.uri}/{o['key']}", "size": o["size"], "version": o["etag"]} for o in objects]
        else:
            out += ts.local_sources(local_files(source))
    return out


def check_enough(n_train: int, per_step: int) -> None:
    if n_train < per_step:
        raise UserError(
            f"the corpus gives {n_train} training sequences, fewer than one batch of {per_step}",
            where="data.sources",
            fix="add text, lower data.min_len, or lower train.micro_batch_size",
        )


RAY_ABOVE_BYTES = 64 << 20  # smaller corpora are prepared in-process: starting Ray costs more than it saves


def _build(
    cfg: DistilConfig,
    tokenizer,
    folder: Path,
    per_step: int,
    info: dict,
    listing: list[dict],
    use_ray: bool,
    workers: int | None = None,
    log=print,
) -> Path:
    """Read, tokenize, pack and split the sources (distil/data/corpus.py, distil/data/sequences.py) and
    write them as a prepared folder. With `use_ray` the reading and tokenizing run as Ray Data
    tasks over the cluster's CPUs (at most `workers` at once); this process only packs, splits
    and writes, which is cheap. A corpus too small for one batch is refused, nothing written."""

    d = cfg.data
    reading, packer = _reading_and_packer(cfg, tokenizer)
    spec = tokenizer_spec(tokenizer)
    segments = plan(d, reading, listing)
    if use_ray:
        from distil.data.ray_tokenize import documents
    else:
        documents = local_documents
    held_out = HeldOut(d.eval_fraction, d.eval_max_sequences, cfg.run.seed)
    progress = _Progress(log)
    with ts.ShardWriter(folder, len(tokenizer)) as writer:
        docs_left = d.max_documents
        for flat, lens in documents(segments, spec, reading, workers, log):
            if docs_left is not None:  # the first max_documents documents of the corpus
                lens = lens[:docs_left]
                flat, docs_left = flat[: int(lens.sum())], docs_left - len(lens)
            writer.add_many("train", *held_out.feed(*packer(flat, lens)))
            progress(len(lens), len(flat))
            if docs_left == 0:
                break
        (rest, rest_lens), (eval_flat, eval_lens) = held_out.finish()
        writer.add_many("train", rest, rest_lens)
        writer.add_many("eval", eval_flat, eval_lens)
        if progress.documents == 0:
            raise UserError(
                "the sources hold no text (every file is empty or whitespace)",
                where="data.sources",
                fix="check data.sources (and data.text_field for jsonl/parquet)",
            )
        check_enough(held_out.n - len(eval_lens), per_step)
        out = writer.close(info)
    progress.done()
    return out


def local_documents(segments, spec: str, reading, workers=None, log=None):
    """Each range or hub batch read and tokenized in this process, in order: (flat ids, lens)."""

    for segment in segments:
        if isinstance(segment, HubSet):
            for batch in segment.dataset.iter(batch_size=corpus.HUB_BATCH_ROWS):
                yield token_ids(spec, [t for t in batch[reading.text_field] if t and t.strip()])
        else:
            for r in segment:
                yield token_ids(spec, read(r, reading))


class _Progress:
    """A line every 30 s while preparing, and one at the end: pods have no terminal for a bar."""

    def __init__(self, log, every: float = 30.0):

        self.log, self.every, self.clock = log, every, time.monotonic
        self.start = self.last = self.clock()
        self.documents = self.tokens = 0

    def __call__(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.log(
                f"  prepared {self.documents:,} documents, {self.tokens:,} tokens "
                f"({self.tokens / (now - self.start):,.0f} tokens/s)"
            )

    def done(self) -> None:
        took = max(self.clock() - self.start, 1e-9)
        self.log(
            f"  prepared {self.documents:,} documents, {self.tokens:,} tokens in {took:.1f} s "
            f"({self.tokens / took:,.0f} tokens/s)"
        )


def _data_section(cfg: DistilConfig) -> dict:
    return {**cfg.data.model_dump(mode="json"), "seed": cfg.run.seed}


def _info(cfg: DistilConfig, tokenizer, listing: list[dict]) -> tuple[str, dict]:
    import tokenizers

    import distil

    fp, inputs = ts.fingerprint(_data_section(cfg), ts.tokenizer_identity(tokenizer), listing)
    return fp, {
        "prepared": inputs,
        "versions": {"distil-run": getattr(distil, "__version__", "?"), "tokenizers": tokenizers.__version__},
    }


def _rows(flat: np.ndarray, lens: np.ndarray) -> list[list[int]]:
    return [s.tolist() for s in np.split(flat, np.cumsum(lens)[:-1])] if len(lens) else []


def _reading_and_packer(cfg: DistilConfig, tokenizer):
    """How the sources are read (the storage's endpoint, region and retries) and how their
    tokens become sequences: the same for a preparation and for `distil eval`."""

    d, s = cfg.data, cfg.storage
    return (
        Reading(d.text_field, s.endpoint_url, s.region, s.max_attempts),
        Packer(tokenizer.cls_token_id, tokenizer.sep_token_id, d.max_len, d.packing, d.min_len),
    )


def _stream(cfg: DistilConfig, tokenizer, listing: list[dict]):
    """This process's sequence stream of the sources: (packer output) per range."""

    reading, packer = _reading_and_packer(cfg, tokenizer)
    for flat, lens in local_documents(plan(cfg.data, reading, listing), tokenizer_spec(tokenizer), reading):
        yield packer(flat, lens)


def sequences_of(cfg: DistilConfig, tokenizer, limit: int) -> list[list[int]]:
    """The first `limit` sequences of `cfg.data`'s sources, read and tokenized in this process
    the way preparation does it, no held-out split and nothing written (`distil eval --data`)."""
    rows: list[list[int]] = []
    for flat, lens in _stream(cfg, tokenizer, source_listing(cfg)):
        rows += _rows(flat, lens)
        if len(rows) >= limit:
            break
    return rows[:limit]


def held_out_of(cfg: DistilConfig, tokenizer, limit: int) -> list[list[int]]:
    """A run's held-out sequences (at most `limit`): read from its prepared data when storage
    has it, else computed in this process exactly as preparation would -- nothing written."""

    listing = source_listing(cfg)
    fp = _info(cfg, tokenizer, listing)[0]
    if _is_prepared(cfg, fp):
        held = open_prepared(cfg, tokenizer, log=lambda _: None)["eval"]
        return held.rows(range(min(len(held), limit)))
    split = HeldOut(cfg.data.eval_fraction, cfg.data.eval_max_sequences, cfg.run.seed)
    for flat, lens in _stream(cfg, tokenizer, listing):
        split.feed(flat, lens)
    return _rows(*split.finish()[1])[:limit]


def _is_prepared(cfg: DistilConfig, fp: str) -> bool:
    where = data_storage(cfg, fp)
    if not where.is_s3:
        return (where.local() / ts.MANIFEST).is_file()
    return ts.MANIFEST in {o["key"] for o in where.list_objects()}


def _use_ray(listing: list[dict]) -> bool:

    if os.environ.get("RAY_ADDRESS"):  # a cluster to use (`ray job submit` sets it)
        return True
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return True
    return sum(e["size"] for e in listing) > RAY_ABOVE_BYTES


def open_prepared(
    cfg: DistilConfig,
    tokenizer,
    per_step: int = 1,
    log=print,
    use_ray: bool | None = None,
    workers: int | None = None,
    fingerprint: str | None = None,
) -> ts.PreparedData:
    """The run's prepared data, prepared now if storage has none for this fingerprint; at least
    `per_step` training sequences (one global batch: a step) or a UserError. `use_ray`: prepare with
    Ray Data (unset: when Ray is running here or RAY_ADDRESS names a cluster, or the sources hold
    more than RAY_ABOVE_BYTES). With `fingerprint` (a Ray worker: the driver prepared it) the
    sources are not listed again -- another node may not even see a local source -- and the
    data must be there, made by this tokenizer from this data section."""
    if fingerprint is not None:
        expect = {
            k: v
            for k, v in ts.fingerprint(_data_section(cfg), ts.tokenizer_identity(tokenizer), [])[1].items()
            if k != "sources"
        }
        return _open(cfg, fingerprint, expect, per_step)
    manifest = ensure_prepared(cfg, tokenizer, per_step, log, use_ray, workers)
    return _open(cfg, manifest["fingerprint"], manifest["prepared"], per_step)


def ensure_prepared(
    cfg: DistilConfig, tokenizer, per_step: int = 1, log=print, use_ray: bool | None = None, workers: int | None = None
) -> dict:
    """Prepare the run's data unless storage has it; its manifest (nothing else is read: the
    Ray driver only needs the fingerprint to hand to the workers)."""
    listing = source_listing(cfg)
    fp, info = _info(cfg, tokenizer, listing)
    where = data_storage(cfg, fp)
    use_ray = _use_ray(listing) if use_ray is None else use_ray
    if where.is_s3:
        if not _is_prepared(cfg, fp):
            _prepare(cfg, tokenizer, fp, info, listing, per_step, log, use_ray, workers)
        manifest = _manifest(cfg, fp)
    else:
        # One process of a host at a time checks, discards and prepares a fingerprint: the ranks
        # of a torchrun wait for the first, then find its data (and its record of the check).
        folder = where.local()
        with _host_lock(folder):
            manifest = _intact(folder, log)
            if manifest is None:
                _prepare(cfg, tokenizer, fp, info, listing, per_step, log, use_ray, workers)
                manifest = ts.read_checked(folder)  # (the writer recorded its check: a stat per file)
    if manifest.get("prepared") != info["prepared"]:
        raise UserError(
            f"{where.uri} was prepared from other inputs than its name says",
            fix="delete that folder (or prefix) and prepare again",
        )
    check_enough(manifest["splits"]["train"]["sequences"], per_step)
    return manifest


@contextlib.contextmanager
def _host_lock(folder: Path):
    """An exclusive lock on `folder` among this host's processes, kept in the temporary folder
    (never in storage: bad input leaves nothing there, not even a lock file)."""

    locks = Path(tempfile.gettempdir()) / "distil-locks"
    locks.mkdir(exist_ok=True)
    name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    with open(locks / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _intact(folder: Path, log) -> dict | None:
    """The manifest of a local prepared folder that is whole (checked once on this host), or
    None: none there, or one that is incomplete or damaged, which is never trained on -- it is
    deleted (it holds nothing but what preparing again writes), with a line saying why."""
    if not folder.exists():
        return None
    if not (folder / ts.MANIFEST).is_file():
        why = f"{folder} holds no {ts.MANIFEST} (a preparation cut short, or damaged)"
    else:
        try:
            return ts.read_checked(folder)
        except DamagedData as e:
            why = e.what
    log(f"warning: {why}; preparing it again")
    remove_tree(folder, folder.parent)
    return None


def _manifest(cfg: DistilConfig, fp: str) -> dict:
    where = data_storage(cfg, fp)
    try:
        manifest = json.loads(where.read_bytes(ts.MANIFEST))
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    problem = "not valid JSON" if manifest is None else manifest_problem(manifest)
    if problem:
        raise DamagedData(where.uri, {ts.MANIFEST: problem}, fix="delete the prefix and prepare again")
    return manifest


def _prepare(
    cfg: DistilConfig,
    tokenizer,
    fp: str,
    info: dict,
    listing: list[dict],
    per_step: int,
    log,
    use_ray: bool,
    workers: int | None,
) -> None:
    where = data_storage(cfg, fp)
    if where.is_s3:
        log(f"preparing the data once: {where.uri}")
        with tempfile.TemporaryDirectory(prefix="distil-prepare-") as tmp:
            shards_s3.upload(
                _build(cfg, tokenizer, Path(tmp) / fp, per_step, info, listing, use_ray, workers, log), where
            )
        return
    folder = where.local()
    log(f"preparing the data once: {folder}")
    made = [p for p in [folder.parent, *folder.parent.parents] if not p.exists()]  # to remove on failure
    try:
        with contextlib.suppress(FileExistsError):  # another rank (torchrun) prepared it meanwhile
            _build(cfg, tokenizer, folder, per_step, info, listing, use_ray, workers, log)
    except BaseException:
        for p in made:  # bad input writes nothing, not even empty folders
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _open(cfg: DistilConfig, fp: str, expect: dict, per_step: int) -> ts.PreparedData:
    """Prepared data `fp` as a rank reads it: local shards checked by size (a restart costs
    seconds), or S3 through this node's cache."""
    where = data_storage(cfg, fp)
    if where.is_s3:
        cache = Path(cfg.data.cache_dir or os.path.expanduser("~/.cache/distil")) / "prepared"
        store = shards_s3.open_remote(where, cache, expect=expect)
    else:
        store = ts.PreparedData(where.local(), expect=expect)  # hashed once on this host, then a stat per file
    check_enough(len(store["train"]), per_step)
    return store
