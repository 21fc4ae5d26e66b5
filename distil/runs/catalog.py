"""What a storage URI holds: runs, their checkpoints, and whether each is complete.

Every run keeps its checkpoints as RUN/step_N (distil/runs/layout.py). A URI may name the
storage root (many runs), one run, or one checkpoint.
A checkpoint is complete when its COMPLETE marker exists and every file of the manifest in
it is present with its recorded size; anything else (a save or upload cut short, a file
truncated in storage) is listed as incomplete, with the reason, and never pulled.
"""

from __future__ import annotations

# Imports inside functions: the checkpoint layout (torch) only for --verify.
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from distil.errors import UserError
from distil.runs.layout import COMPLETE, is_tag, step_of, tag_key
from distil.storage.integrity import HASH_THREADS, describe
from distil.storage.location import Storage, s3_errors
from distil.storage.paths import check_relative


@dataclass
class CheckpointInfo:
    run: str  # the run's path relative to the URI ("" when the URI is the run)
    tag: str
    prefix: str  # the checkpoint folder relative to the URI
    objects: dict[str, dict] = field(default_factory=dict)  # relative to the folder -> list entry
    complete: bool = False
    problem: str | None = None
    meta: dict = field(default_factory=dict)  # the COMPLETE record: tokens, loss, saved_at, files
    verified: bool | None = None  # every file's sha256 checked (`checkpoints list --verify`); None: sizes only

    @property
    def step(self) -> int:
        return step_of(self.tag)

    @property
    def size(self) -> int:
        """Bytes of the checkpoint: its manifest's files once complete (an unfinished earlier
        upload of the same step may have left others), else everything found."""
        listed = self.meta.get("files") if self.complete else None
        return sum(o["size"] for k, o in self.objects.items() if listed is None or k in listed or k == COMPLETE)

    @property
    def mtime(self) -> float:
        return max(o["mtime"] for o in self.objects.values())

    def row(self) -> dict:
        return {
            "run": self.run or ".",
            "step": self.step,
            "complete": self.complete,
            "tokens": self.meta.get("tokens"),
            "loss": self.meta.get("loss"),
            "saved_at": self.meta.get("saved_at"),
            "size": self.size,
            "world_size": self.meta.get("world_size"),
            "problem": self.problem,
            "path": self.prefix,
            "verified": self.verified,
        }


def _split(rel: str, uri_tag: str | None) -> tuple[str, str, str] | None:
    """key relative to the URI -> (run, checkpoint prefix, key within the checkpoint)."""
    parts = PurePosixPath(rel).parts
    if uri_tag is not None:  # the URI is a checkpoint folder
        return "", "", rel
    for i, p in enumerate(parts[:-1]):
        if is_tag(p):
            return "/".join(parts[:i]), "/".join(parts[: i + 1]), "/".join(parts[i + 1 :])
    return None


def _check(info: CheckpointInfo, storage: Storage) -> None:
    if COMPLETE not in info.objects:
        info.problem = "no COMPLETE marker: the save or its upload did not finish"
        return
    links = [k for k, o in info.objects.items() if o.get("link")]
    if links:
        info.problem = f"{links[0]} is a symbolic link (never followed out of a checkpoint)"
        return
    try:
        info.meta = json.loads(storage.read_bytes(info.objects[COMPLETE]["key"]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        info.problem = "COMPLETE marker is not valid JSON"
        return
    files = info.meta.get("files") if isinstance(info.meta, dict) else None
    if not isinstance(files, dict):
        info.meta = {}
        info.problem = "COMPLETE marker has no file manifest (written by an older distil-run)"
        return
    unsafe = [
        k for k, v in files.items() if not _is_safe(k) or not isinstance(v, dict) or not isinstance(v.get("size"), int)
    ]
    if unsafe:
        info.problem = f"manifest entry {unsafe[0]!r} is not a path inside the checkpoint with a size"
        return
    missing = [k for k in files if k not in info.objects]
    short = [k for k, v in files.items() if k in info.objects and info.objects[k]["size"] != v["size"]]
    if missing:
        info.problem = f"{len(missing)} of {len(files)} files missing (e.g. {missing[0]}): an upload did not finish"
    elif short:
        info.problem = f"{short[0]} is {info.objects[short[0]]['size']} bytes, the manifest says {files[short[0]]['size']} (truncated)"
    else:
        info.complete = True


def _is_safe(key: str) -> bool:
    try:
        check_relative(key)
    except UserError:
        return False
    return True


def list_checkpoints(storage: Storage, objects: list[dict] | None = None) -> list[CheckpointInfo]:
    """Every checkpoint under the URI, by run and step; `objects`: its listing, if already made."""
    uri_tag = PurePosixPath(storage.uri).name if is_tag(PurePosixPath(storage.uri).name) else None
    found: dict[tuple[str, str], CheckpointInfo] = {}
    for obj in storage.list_objects() if objects is None else objects:
        split = _split(obj["key"], uri_tag)
        if split is None:
            continue
        run, prefix, inner = split
        tag = uri_tag or PurePosixPath(prefix).name
        found.setdefault((run, prefix), CheckpointInfo(run=run, tag=tag, prefix=prefix)).objects[inner] = obj
    infos = sorted(found.values(), key=lambda c: (c.run, tag_key(c.tag)))
    for info in infos:
        _check(info, storage)
    return infos


def verify_checkpoint(storage: Storage, info: CheckpointInfo) -> str | None:
    """What a complete-looking checkpoint fails of the full check a resume, export or pull makes
    (distil/runs/layout.py `damage`: every file's sha256 against the manifest, trainer_state.json
    at COMPLETE's step), or None. A local checkpoint is hashed in place; an S3 one is read
    through (every byte once, nothing written to disk)."""
    if not storage.is_s3:
        from distil.runs.layout import damage

        return damage(storage.local() / info.prefix if info.prefix else storage.local())

    client = storage.client(max_pool_connections=HASH_THREADS)

    def digest(rel: str) -> str:
        h = hashlib.sha256()
        body = client.get_object(Bucket=storage.bucket, Key=storage.key(info.objects[rel]["key"]))["Body"]
        for chunk in body.iter_chunks(1 << 20):
            h.update(chunk)
        return h.hexdigest()

    files = info.meta["files"]
    with s3_errors(storage.uri, storage.endpoint_url), ThreadPoolExecutor(HASH_THREADS) as pool:
        found = dict(zip(files, pool.map(digest, files)))
    problems = {
        rel: "sha256 differs from the manifest" for rel, want in files.items() if found[rel] != want.get("sha256")
    }
    if problems:
        return describe(dict(sorted(problems.items())))
    if "trainer_state.json" in files:
        trainer = json.loads(storage.read_bytes(info.objects["trainer_state.json"]["key"]))
        if not isinstance(trainer, dict) or trainer.get("step") != info.meta.get("step"):
            return f"trainer_state.json says step {trainer.get('step') if isinstance(trainer, dict) else None!r}, COMPLETE {info.meta.get('step')!r}"
    return None


def select(infos: list[CheckpointInfo], uri: str, step: str | int | None) -> CheckpointInfo:
    """The checkpoint `pull` should take: one run, `latest` complete or the given step."""
    if not infos:
        raise UserError(f"no checkpoints under {uri}", fix="check the URI with `distil checkpoints list`")
    runs = sorted({c.run for c in infos})
    if len(runs) > 1:
        raise UserError(
            f"{uri} holds {len(runs)} runs ({', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''})",
            fix=f"name one: {uri.rstrip('/')}/RUN",
        )
    complete = [c for c in infos if c.complete]
    if step in (None, "latest"):
        if not complete:
            newest = infos[-1]
            raise UserError(
                f"{uri} has no complete checkpoint ({len(infos)} incomplete; the newest, {newest.tag}: "
                f"{newest.problem})",
                fix="wait for the run to save one, or resume it",
            )
        return complete[-1]
    try:
        want = int(step)
    except ValueError:
        raise UserError(f"--step {step!r} is not a number", fix="give --step N or --step latest") from None
    for c in reversed(infos):  # the newest save of that step (a step saved again is step_N.1)
        if c.step == want:
            if not c.complete:
                raise UserError(
                    f"checkpoint at step {want} is incomplete: {c.problem}",
                    fix=f"pull a complete one ({', '.join(str(x.step) for x in complete) or 'none yet'})",
                )
            return c
    raise UserError(
        f"no checkpoint at step {want} under {uri}",
        fix=f"choose one of the complete steps: {', '.join(str(x.step) for x in complete) or 'none yet'}",
    )


def format_table(infos: list[CheckpointInfo]) -> str:
    lines = [f"{'run':30s} {'step':>8s} {'tokens':>14s} {'loss':>9s} {'saved (UTC)':20s} {'size':>10s}  state"]
    for c in infos:
        r = c.row()
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
        tokens = f"{r['tokens']:,}" if r["tokens"] is not None else "-"
        state = (
            "complete" + (", verified" if c.verified else "")
            if c.complete
            else f"DAMAGED: {c.problem}"
            if c.verified is False
            else f"INCOMPLETE: {c.problem}"
        )
        lines.append(
            f"{r['run']:30s} {c.step:8d} {tokens:>14s} {loss:>9s} {r['saved_at'] or '-':20s} {_human(c.size):>10s}  {state}"
        )
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
