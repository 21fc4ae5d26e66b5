"""A run's data, tokenized once: `STORAGE/data/<fingerprint>/` (distil/token_store.py), opened
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

import contextlib
import json
import os
import tempfile
from pathlib import Path

from distil import token_store as ts
from distil.config import DistilConfig
from distil.errors import UserError


def data_root(cfg: DistilConfig) -> str:
    """Where prepared data lives: beside the runs, shared by every run of the same data."""
    return f"{cfg.storage.uri.rstrip('/')}/data"


def _storage_options(cfg: DistilConfig) -> dict:
    return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}


def source_listing(cfg: DistilConfig) -> list[dict]:
    """What the fingerprint covers of the sources: every file's name, size and mtime (local) or
    ETag (S3); a hub data set by its name, configuration and arguments."""
    from distil.data import _local_files, is_hub_name
    from distil.storage import Storage

    out = []
    for source in cfg.data.sources:
        if is_hub_name(source):
            out.append({"name": f"hub:{source}", "size": 0,
                        "version": json.dumps([cfg.data.hub_config, cfg.data.hub_kwargs], sort_keys=True, default=str)})
        elif source.startswith("s3://"):
            storage = Storage(source, **_storage_options(cfg))
            out += [{"name": f"{storage.uri}/{o['key']}", "size": o["size"], "version": o["etag"]} for o in storage.list_objects()]
        elif not Path(source).expanduser().exists():
            raise UserError(f"{source} does not exist", where="data.sources", fix="correct the path")
        else:
            out += ts.local_sources(_local_files(source))
    return out


def check_enough(n_train: int, per_step: int) -> None:
    if n_train < per_step:
        raise UserError(f"the corpus gives {n_train} training sequences, fewer than one batch of {per_step}",
                        where="data.sources", fix="add text, lower data.min_len, or lower train.micro_batch_size")


def _build(cfg: DistilConfig, tokenizer, folder: Path, per_step: int, info: dict) -> Path:
    """Tokenize the sources (distil.data) and write them as a prepared folder; a corpus too small
    for one batch of `per_step` sequences is refused before anything is written."""
    from distil.data import load_documents, split_eval, tokenize

    docs = load_documents(cfg.data, _storage_options(cfg))
    train, held_out = split_eval(tokenize(docs, tokenizer, cfg.data), cfg.data, cfg.run.seed)
    check_enough(len(train), per_step)
    with ts.TokenStoreWriter(folder, len(tokenizer)) as writer:
        for split, seqs in (("train", train), ("eval", held_out)):
            for batch in seqs.iter(batch_size=4096):
                for seq in batch["input_ids"]:
                    writer.add(split, seq)
        return writer.close(info)


def _info(cfg: DistilConfig, tokenizer) -> tuple[str, dict]:
    import datasets
    import tokenizers
    import transformers

    fp, inputs = ts.fingerprint({**cfg.data.model_dump(mode="json"), "seed": cfg.run.seed},
                                ts.tokenizer_identity(tokenizer), source_listing(cfg))
    return fp, {"prepared": inputs, "versions": {"datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
                                                 "transformers": transformers.__version__}}


def open_prepared(cfg: DistilConfig, tokenizer, per_step: int = 1, log=print) -> ts.TokenStore:
    """The run's prepared data, prepared now if storage has none for this fingerprint; at least
    `per_step` training sequences (one global micro-batch) or a UserError."""
    from distil.storage import Storage

    fp, info = _info(cfg, tokenizer)
    root = data_root(cfg)
    if not root.startswith("s3://"):
        folder = Path(root).expanduser() / fp
        if not (folder / ts.MANIFEST).is_file():
            log(f"preparing the data once: {folder}")
            with contextlib.suppress(FileExistsError):  # another rank (torchrun) prepared it meanwhile
                _build(cfg, tokenizer, folder, per_step, info)
        store = ts.TokenStore(folder, expect=info["prepared"], verify=False)  # sizes: restarts cost seconds
        check_enough(len(store["train"]), per_step)
        return store
    storage = Storage(f"{root}/{fp}", **_storage_options(cfg))
    if ts.MANIFEST not in {o["key"] for o in storage.list_objects()}:
        log(f"preparing the data once: {storage.uri}")
        with tempfile.TemporaryDirectory(prefix="distil-prepare-") as tmp:
            ts.publish(_build(cfg, tokenizer, Path(tmp) / fp, per_step, info), storage)
    cache = Path(cfg.data.cache_dir or os.path.expanduser("~/.cache/distil")) / "prepared"
    store = ts.open_remote(storage, cache, expect=info["prepared"])
    check_enough(len(store["train"]), per_step)
    return store
