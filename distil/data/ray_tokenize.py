"""Reading and tokenizing a corpus as Ray Data tasks over every CPU of the Ray cluster.

Each file range (distil/data/corpus.py) is one task: it reads its bytes (from local disk or S3),
decodes, tokenizes with the teacher's tokenizer rebuilt from its serialization, and returns
the documents' token ids as an Arrow list column. Ray Data runs the tasks on any node with a
free CPU and hands the results back *in order* (`preserve_order`), so the driver -- which only
packs, splits and writes (distil/data/prepared.py) -- sees the same stream as one process would.
A hub data set, already loaded on the driver (into data.cache_dir), goes in as Arrow tables, a
window at a time (`HUB_WINDOW_BATCHES`: the object store never holds the whole set), each
window cut into the batches of the in-process path (corpus.HUB_BATCH_ROWS), tokenized as tasks
on any node. Not `ray.data.from_huggingface`: to look for the hub's own Parquet files it
calls `load_dataset` again with only the set's name, without data.cache_dir or data.hub_kwargs --
a second download into the default cache for a hub set, and for a local "json" or "text" set a
minute spent globbing the working directory as data.

Why tasks and not an actor pool: an actor claims its CPU for the whole run, and a pool that
claims every CPU starves Ray Data's read tasks (on 2 CPUs the pipeline hung); here reading
and tokenizing are one task, so there is nothing to starve.

Local source files exist only on this node: their tasks are pinned to it. A node that offers Ray
no CPU (a KubeRay head started with `num-cpus: 0`, so that no task lands there) can run no task:
there local files are read and tokenized in this process instead, as `distil train` does. Put a
corpus that should be read by the whole cluster in S3.
"""

from __future__ import annotations

# Imports inside functions: Ray only where its tasks are started.
import dataclasses
import json

import numpy as np
import pyarrow as pa

from distil.data import corpus
from distil.data.corpus import HubSet, Range, Reading, read
from distil.data.sequences import token_ids
from distil.errors import UserError

HUB_WINDOW_BATCHES = 64  # batches of a hub set (corpus.HUB_BATCH_ROWS records each) in the object store at a time

# A task that meets bad input (a file that is not UTF-8, a record without the text field) says so
# in its result: an exception raised in a task reaches the driver as text wrapped in Ray's own
# exceptions, and the driver owes the user one message, not a traceback.
_IDS = pa.schema([("ids", pa.list_(pa.int32())), ("error", pa.string())])


def _table(flat: np.ndarray, lens: np.ndarray) -> pa.Table:
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32()))
    return pa.Table.from_arrays([ids, pa.nulls(len(lens), pa.string())], schema=_IDS)


def _refused(e: UserError) -> pa.Table:
    message = json.dumps({"what": e.what, "where": e.where, "fix": e.fix})
    return pa.Table.from_arrays([pa.array([[]], type=pa.list_(pa.int32())), pa.array([message])], schema=_IDS)


def _read_and_tokenize(batch: pa.Table, spec: str, reading: Reading) -> pa.Table:
    """One task: the ranges of this batch (one, by batch_size) read and tokenized."""
    flats, lens = [], []
    try:
        for item in batch.column("range").to_pylist():
            f, n = token_ids(spec, read(Range(**item), reading))
            flats.append(f)
            lens.append(n)
    except UserError as e:
        return _refused(e)
    return _table(np.concatenate(flats), np.concatenate(lens))


def _tokenize_texts(batch: pa.Table, spec: str, field: str) -> pa.Table:
    texts = [t for t in batch.column(field).to_pylist() if t and t.strip()]
    return _table(*token_ids(spec, texts))


def documents(segments, spec: str, reading: Reading, workers: int | None = None, log=print):
    """(flat int32 ids, each document's length) per range or hub block, in corpus order."""
    import ray

    started = not ray.is_initialized()
    if started:  # (`distil prepare`, or `distil train` on a large corpus): ours, shut down when done
        ray.init(include_dashboard=False, log_to_driver=True)
    try:
        yield from _blocks(segments, spec, reading, workers, log)
    finally:
        if started:
            ray.shutdown()


def _offers_cpu(node_id: str) -> bool:
    """Whether this Ray node has CPUs for tasks (a head started with `--num-cpus 0` has none)."""
    import ray

    return any(n["NodeID"] == node_id and n.get("Resources", {}).get("CPU", 0) > 0 for n in ray.nodes())


def _blocks(segments, spec: str, reading: Reading, workers: int | None, log=print):

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the driver packs the stream in corpus order
    ctx.enable_progress_bars = False  # pods have no terminal; distil/data/prepared.py logs progress
    node = ray.get_runtime_context().get_node_id()
    here, said = {"ray.io/node-id": node}, False
    compute = ray.data.TaskPoolStrategy(size=workers)
    for segment in segments:
        if not isinstance(segment, HubSet) and not all(r.s3 for r in segment) and not _offers_cpu(node):
            if not said:
                log(
                    "the local source files are tokenized in this process: this Ray node offers no CPU for tasks "
                    "(put the corpus in S3 to have it read by the whole cluster)"
                )
                said = True
            for r in segment:  # (the files are on this node only)
                yield token_ids(spec, read(r, reading))
            continue
        if isinstance(segment, HubSet):
            # (the set's Arrow files are memory-mapped: a window is read when it is put)
            rows = corpus.HUB_BATCH_ROWS  # (read at each call: a test makes it small)
            for window in segment.dataset.with_format("arrow").iter(batch_size=HUB_WINDOW_BATCHES * rows):
                blocks = [window.slice(i, rows) for i in range(0, len(window), rows)]
                ds = ray.data.from_arrow(blocks).map_batches(
                    _tokenize_texts,
                    fn_kwargs={"spec": spec, "field": reading.text_field},
                    batch_size=None,  # one task per block
                    batch_format="pyarrow",
                    compute=compute,
                )
                yield from _token_blocks(ds)
            continue
        items = [{"range": dataclasses.asdict(r)} for r in segment]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _read_and_tokenize,
            fn_kwargs={"spec": spec, "reading": reading},
            batch_size=1,
            batch_format="pyarrow",
            compute=compute,
            label_selector=None if all(r.s3 for r in segment) else here,
        )
        yield from _token_blocks(ds)


def _token_blocks(ds):
    """The (flat ids, lengths) of each block of `ds`, in order; a task's refusal raised here."""
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        errors = block.column("error").drop_null()
        if len(errors):
            raise UserError(**json.loads(errors[0].as_py()))
        ids = block.column("ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        flat = ids.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        yield flat.astype(np.int32, copy=False), np.diff(offsets).astype(np.int64)
