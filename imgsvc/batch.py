"""`imgsvc batch <operation> FILES_OR_DIRS… --out DIR`: many images through the jobs API.

The images are sent in chunks, one job per chunk. Everything needed to resume is kept in
`--out/.imgsvc-batch.json`, written before every submission: each chunk's files (relative path
and sha256), its Idempotency-Key, its job id once known and whether its outputs were saved. A
rerun of the same command resumes: a chunk whose job id was not recorded is submitted again
with its recorded key, which the service answers with the same job, without a second charge.
Outputs already in `--out` are skipped unless their input changed since it was processed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, TextIO

import httpx

from imgsvc.client import ApiError, Client, InvalidResponse, Job, JobItem, new_idempotency_key
from imgsvc.client.options import Operation

OPERATIONS: tuple[Operation, ...] = ("remove-background", "upscale", "inpaint")
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".avif"}
)
STATE_NAME = ".imgsvc-batch.json"
MANIFESTS_DIR = ".imgsvc-manifests"
STATE_VERSION = 1
DEFAULT_API_URL = "http://127.0.0.1:8000"
POLL_S = 1.0
# Form fields of a job that are not an operation's options.
RESERVED_FIELDS = frozenset({"operation", "files", "file", "webhook_url"})
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")

EXIT_OK = 0
EXIT_FAILED_ITEMS = 1
EXIT_USAGE = 2
EXIT_NOT_CONFIRMED = 3
EXIT_API_ERROR = 4
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command that cannot run as given (exit 2)."""


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input image: where it is, and its name (relative path, `/`-separated) in the job."""

    path: Path
    name: str


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def collect(inputs: Sequence[Path], out: Path) -> list[Source]:
    """The images of files and directories (recursively, hidden entries and --out left out)."""
    out_dir = out.resolve()
    sources: list[Source] = []
    for given in inputs:
        if given.is_dir():
            root = given.resolve()
            if root == out_dir:
                raise UsageError(f"{given}: the input folder cannot also be --out")
            for dirpath, dirnames, filenames in os.walk(given):
                here = Path(dirpath)
                dirnames[:] = sorted(
                    d for d in dirnames if not d.startswith(".") and (here / d).resolve() != out_dir
                )
                for filename in sorted(filenames):
                    path = here / filename
                    if is_image(path) and path.is_file():
                        sources.append(Source(path, path.relative_to(given).as_posix()))
        elif given.is_file():
            if not is_image(given):
                raise UsageError(f"{given}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            sources.append(Source(given, given.name))
        else:
            raise UsageError(f"{given}: no such file or directory")
    _check_unique(sources)
    return sources


def _check_unique(sources: Sequence[Source]) -> None:
    """Two inputs whose outputs would land on the same path (the extension is the service's)."""
    seen: dict[str, Source] = {}
    for source in sources:
        stem = str(PurePosixPath(source.name).with_suffix(""))
        other = seen.setdefault(stem, source)
        if other is not source:
            raise UsageError(
                f"{other.path} and {source.path} would both be saved as {stem}.<extension>"
            )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ExistingOutputs:
    """Whether `--out/<name without extension>.*` exists (one listing per folder)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._stems: dict[PurePosixPath, set[str]] = {}

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        rel = PurePosixPath(name)
        stems = self._stems.get(rel.parent)
        if stems is None:
            folder = self.out / rel.parent
            stems = set()
            with contextlib.suppress(OSError):
                stems = {
                    Path(e.name).stem
                    for e in os.scandir(folder)
                    if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix
                }
            self._stems[rel.parent] = stems
        return rel.stem in stems


# -- state -------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """One job's worth of files."""

    idempotency_key: str
    files: dict[str, str]  # name → sha256, in submission order
    quoted_credits: int = 0
    job_id: str | None = None
    downloaded: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "idempotency_key": self.idempotency_key,
            "files": [{"name": n, "sha256": h} for n, h in self.files.items()],
            "quoted_credits": self.quoted_credits,
            "job_id": self.job_id,
            "downloaded": self.downloaded,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Chunk:
        return cls(
            idempotency_key=str(raw["idempotency_key"]),
            files={str(f["name"]): str(f["sha256"]) for f in raw["files"]},
            quoted_credits=int(raw.get("quoted_credits", 0)),
            job_id=None if raw.get("job_id") is None else str(raw["job_id"]),
            downloaded=bool(raw.get("downloaded", False)),
        )


@dataclass
class State:
    """The state file: the command it belongs to, its chunks, and the outputs saved so far."""

    operation: str
    options: dict[str, str]
    webhook_url: str | None
    chunks: list[Chunk] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # name → sha256 of its input

    def same_command(self, other: State) -> bool:
        return (self.operation, self.options, self.webhook_url) == (
            other.operation,
            other.options,
            other.webhook_url,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "operation": self.operation,
            "options": self.options,
            "webhook_url": self.webhook_url,
            "chunks": [c.to_json() for c in self.chunks],
            "outputs": self.outputs,
        }

    def save(self, path: Path) -> None:
        """Written whole to a temporary file, then renamed over the old one."""
        _write_atomic(path, json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> State | None:
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: unreadable ({exc}); remove it to start over") from None
        try:
            if raw.get("version") != STATE_VERSION:
                raise ValueError(f"version {raw.get('version')!r}")
            return cls(
                operation=str(raw["operation"]),
                options={str(k): str(v) for k, v in raw["options"].items()},
                webhook_url=raw.get("webhook_url"),
                chunks=[Chunk.from_json(c) for c in raw["chunks"]],
                outputs={str(k): str(v) for k, v in raw.get("outputs", {}).items()},
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{path}: not a batch state file ({exc}); remove it") from None


def _write_atomic(dest: Path, data: bytes | IO[bytes]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                shutil.copyfileobj(data, f, 1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- planning ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What this run does: chunks to resume, new chunks, and what it skips."""

    state: State
    resumed: list[Chunk]
    new: list[Chunk]
    skipped_existing: list[str]


class _Hashes:
    """sha256 of inputs by name, each file read at most once."""

    def __init__(self, sources: Mapping[str, Source]) -> None:
        self.sources = sources
        self._cache: dict[str, str] = {}

    def get(self, name: str) -> str | None:
        if name not in self.sources:
            return None
        if name not in self._cache:
            self._cache[name] = sha256_file(self.sources[name].path)
        return self._cache[name]


def resumable(previous: State | None, command: State, hashes: _Hashes) -> list[Chunk]:
    """The unfinished chunks of the previous run that can go on as they are.

    A chunk whose files changed is dropped (its files are planned anew); so is one that was
    never submitted and lost a file. A chunk with a job id goes on even without its files.
    """
    if previous is None:
        return []
    unfinished = [c for c in previous.chunks if not c.downloaded]
    if unfinished and not previous.same_command(command):
        raise UsageError(
            f"--out holds an unfinished batch of {previous.operation} with options "
            f"{previous.options or '{}'}: rerun that command to finish it, or pass "
            "--reprocess-existing to start over"
        )
    kept: list[Chunk] = []
    for chunk in unfinished:
        now = {name: hashes.get(name) for name in chunk.files}
        if any(h is not None and h != chunk.files[n] for n, h in now.items()):
            continue
        if chunk.job_id is None and None in now.values():
            continue
        kept.append(chunk)
    return kept


def plan_new(
    sources: Sequence[Source],
    state: State,
    hashes: _Hashes,
    existing: ExistingOutputs,
    *,
    chunk_size: int,
    reprocess_existing: bool,
) -> tuple[list[Chunk], list[str]]:
    """New chunks for the inputs not in a resumed chunk; and the names skipped as done."""
    claimed = {name for chunk in state.chunks for name in chunk.files}
    todo: dict[str, str] = {}
    skipped: list[str] = []
    for source in sources:
        if source.name in claimed:
            continue
        if not reprocess_existing and source.name in existing:
            recorded = state.outputs.get(source.name)
            if recorded is None or recorded == hashes.get(source.name):
                skipped.append(source.name)
                continue
        todo[source.name] = hashes.get(source.name) or ""
    names = list(todo)
    chunks = [
        Chunk(new_idempotency_key(), {n: todo[n] for n in names[i : i + chunk_size]})
        for i in range(0, len(names), chunk_size)
    ]
    return chunks, skipped


# -- results -----------------------------------------------------------------------------------


def safe_member_name(name: str) -> bool:
    """A relative `/`-separated path that stays inside --out and names no hidden entry."""
    if not name or "\\" in name or ".." in name or "\x00" in name or ":" in name:
        return False
    if name.startswith("/"):
        return False
    return all(part and not part.startswith(".") for part in name.split("/"))


def unpack_result(
    zip_path: Path, out: Path, wanted: Iterable[str], manifest_dest: Path | None = None
) -> tuple[set[str], list[str]]:
    """Save the wanted members of a result zip into `out`; (names saved, names refused).

    Only names that are both wanted and safe are written; `manifest.json` goes to
    `manifest_dest`, `manifest.csv` is left in the zip, and anything else is refused.
    """
    wanted_names = set(wanted)
    out_dir = out.resolve()
    written: set[str] = set()
    refused: list[str] = []
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            name = info.filename
            if info.is_dir() or name == "manifest.csv":
                continue
            if name == "manifest.json" and manifest_dest is not None:
                with archive.open(info) as member:
                    _write_atomic(manifest_dest, member)
                continue
            if name not in wanted_names or not safe_member_name(name):
                refused.append(name)
                continue
            dest = out / name
            if not dest.parent.resolve().is_relative_to(out_dir):
                refused.append(name)  # a link inside --out pointing elsewhere
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as member:
                _write_atomic(dest, member)
            written.add(name)
    return written, refused


@dataclass
class Failure:
    name: str
    code: str
    message: str


def save_outputs(client: Client, job: Job, out: Path) -> list[Failure]:
    """Download a finished job's results into --out; the items that gave no output."""
    job_id = _job_id(job)
    wanted = {i.output_name: i.name for i in job.items if i.status == "succeeded" and i.output_name}
    failures = [
        Failure(i.name, *_item_error(i)) for i in job.items if i.status in ("failed", "canceled")
    ]
    written: set[str] = set()
    if wanted:
        zip_path = out / f".imgsvc-{job_id}.zip.part"
        try:
            client.download_result(job_id, zip_path)
            written, _ = unpack_result(
                zip_path, out, wanted, out / MANIFESTS_DIR / f"{job_id}.json"
            )
        except zipfile.BadZipFile:
            raise InvalidResponse(
                200, "invalid_result", f"the result of {job_id} is not a zip"
            ) from None
        finally:
            with contextlib.suppress(OSError):
                zip_path.unlink()
    for output_name, name in wanted.items():
        if output_name not in written:
            failures.append(
                Failure(name, "output_refused", f"result member {output_name!r} not saved")
            )
    return failures


def _refused(chunk: Chunk, failed: Sequence[Any]) -> list[Failure]:
    """The images of a chunk the service refused whole, each with its reason."""
    reasons = {str(f.get("name")): _error_of(f) for f in failed if isinstance(f, dict)}
    return [
        Failure(name, *reasons.get(name, ("not_processed", "no image of its job was valid")))
        for name in chunk.files
    ]


def _error_of(item: Mapping[str, Any]) -> tuple[str, str]:
    error = item.get("error")
    if isinstance(error, dict):
        return str(error.get("code") or "failed"), str(error.get("message") or "")
    status = str(item.get("status"))
    return status, f"item {status}"


def _item_error(item: JobItem) -> tuple[str, str]:
    if item.error is not None:
        return item.error.code or "failed", item.error.message
    return item.status, f"item {item.status}"


def _job_id(job: Job) -> str:
    """The job's id, checked to be safe in a file name."""
    if not _JOB_ID.fullmatch(job.id) or job.id.strip(".") == "":
        raise InvalidResponse(200, "invalid_response", f"the service answered a job id {job.id!r}")
    return job.id


# -- progress ----------------------------------------------------------------------------------


class Progress:
    """One line on stderr: in place on a terminal, a new line on each change otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._start: tuple[float, int] | None = None
        self._last: tuple[int, ...] | None = None
        self._open = False

    def update(self, jobs: Iterable[Job]) -> None:
        total = done = failed = charged = 0
        for job in jobs:
            p = job.progress
            total += p.total
            failed += p.failed + p.canceled
            done += p.done
            charged += job.credits_charged
        now = time.monotonic()
        if self._start is None:
            self._start = (now, done)
        figures = (done, failed, total, charged)
        if not self.tty and figures == self._last:
            return
        self._last = figures
        line = f"{done}/{total} done, {failed} failed, {charged} credits charged"
        eta = _eta(self._start, now, done, total)
        if eta:
            line += f", ETA {eta}"
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def _eta(start: tuple[float, int], now: float, done: int, total: int) -> str:
    elapsed, since = now - start[0], done - start[1]
    if since <= 0 or elapsed <= 0 or done >= total:
        return ""
    seconds = int((total - done) * elapsed / since)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# -- the command -------------------------------------------------------------------------------


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """`--option k=v` pairs as form fields."""
    options: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _OPTION_NAME.fullmatch(name):
            raise UsageError(f"--option {pair!r}: expected NAME=VALUE")
        if name in RESERVED_FIELDS:
            raise UsageError(f"--option {name}: not an option of an operation")
        if name in options:
            raise UsageError(f"--option {name} given twice")
        options[name] = value
    return options


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `imgsvc batch` (its handler is `run`)."""
    b = subparsers.add_parser(
        "batch",
        help="process many images through the jobs API, resumable",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("operation", choices=OPERATIONS)
    b.add_argument("inputs", nargs="+", type=Path, metavar="FILES_OR_DIRS")
    b.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for the outputs and the state",
    )
    b.add_argument(
        "--api-url", metavar="URL", help=f"service URL (IMGSVC_API_URL, default {DEFAULT_API_URL})"
    )
    b.add_argument("--key", help="API key (IMGSVC_API_KEY)")
    b.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the operation, e.g. scale=2 or format=webp (repeatable)",
    )
    b.add_argument(
        "--confirm-over",
        type=int,
        default=1000,
        metavar="N",
        help="ask before spending more than N credits (default 1000)",
    )
    b.add_argument("--yes", "-y", action="store_true", help="do not ask")
    b.add_argument(
        "--chunk-size", type=int, default=100, metavar="N", help="images per job (default 100)"
    )
    b.add_argument(
        "--reprocess-existing",
        action="store_true",
        help="process inputs whose output exists too, and start a fresh state",
    )
    b.add_argument(
        "--webhook-url", metavar="URL", help="the service calls it when each job finishes"
    )
    b.set_defaults(func=run)


def run(
    args: argparse.Namespace,
    settings: object = None,
    *,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """`imgsvc batch`; the exit status. (`settings`, the service's own, is not used.)"""
    err = sys.stderr
    try:
        key = args.key or os.environ.get("IMGSVC_API_KEY")
        if not key:
            raise UsageError("no API key: pass --key or set IMGSVC_API_KEY")
        if args.chunk_size < 1:
            raise UsageError("--chunk-size must be at least 1")
        command = State(args.operation, parse_options(args.option), args.webhook_url)
        sources = collect(args.inputs, args.out)
        if not sources:
            raise UsageError("no images among the files and folders given")
        api_url = args.api_url or os.environ.get("IMGSVC_API_URL") or DEFAULT_API_URL
        with Client(api_url, key, transport=transport) as client:
            return _Batch(args, command, sources, client).run()
    except UsageError as exc:
        err.write(f"imgsvc batch: {exc}\n")
        return EXIT_USAGE
    except OSError as exc:
        err.write(f"imgsvc batch: {exc}\n")
        return EXIT_USAGE


class _Batch:
    """One run of the command, once its arguments are checked."""

    def __init__(
        self, args: argparse.Namespace, command: State, sources: list[Source], client: Client
    ) -> None:
        self.args = args
        self.out: Path = args.out
        self.state_path = self.out / STATE_NAME
        self.command = command
        self.operation = _operation(command.operation)
        self.sources = sources
        self.by_name = {s.name: s for s in sources}
        self.client = client
        self.jobs: dict[str, Job] = {}  # idempotency key → latest job object
        self.progress = Progress(sys.stderr)
        self.state_saved = False
        self.refused: list[Failure] = []  # images of chunks the service refused as a whole

    def run(self) -> int:
        err = sys.stderr
        try:
            plan = self._plan()
            if not plan.resumed and not plan.new:
                return self._summary(plan, [])
            images = sum(len(c.files) for c in plan.state.chunks)
            err.write(
                f"{images} images in {len(plan.state.chunks)} jobs ({len(plan.resumed)} resumed),"
                f" {len(plan.skipped_existing)} skipped as their output exists\n"
            )
            if plan.new and not self._confirm(plan.new):
                return EXIT_NOT_CONFIRMED
            self._save(plan.state)
            self._submit(plan.state)
            failures = self.refused + self._follow(plan.state)
            return self._summary(plan, failures)
        except KeyboardInterrupt:
            self.progress.end_line()
            if self.state_saved:
                err.write(
                    f"\ninterrupted; the state is saved in {self.state_path} and submitted jobs"
                    " go on on the service. Run the same command again to resume (nothing is"
                    f" charged twice):\n  {_command_line()}\n"
                )
            else:
                err.write("\ninterrupted; this run submitted nothing\n")
            return EXIT_INTERRUPTED
        except ApiError as exc:
            self.progress.end_line()
            err.write(f"imgsvc batch: the service answered {exc.code}: {exc.message}\n")
            if "credits_required" in exc.details:
                err.write(f"  credits required: {exc.details['credits_required']}\n")
            if exc.request_id:
                err.write(f"  request id: {exc.request_id}\n")
            if self.state_saved:
                err.write("  the state is saved: run the same command again to resume\n")
            return EXIT_API_ERROR

    def _plan(self) -> Plan:
        previous = None if self.args.reprocess_existing else State.load(self.state_path)
        hashes = _Hashes(self.by_name)
        state = State(self.command.operation, self.command.options, self.command.webhook_url)
        if previous is not None:
            state.outputs = dict(previous.outputs)
        resumed = [c for c in resumable(previous, self.command, hashes) if self._job_alive(c)]
        state.chunks = list(resumed)
        new, skipped = plan_new(
            self.sources,
            state,
            hashes,
            ExistingOutputs(self.out),
            chunk_size=self.args.chunk_size,
            reprocess_existing=self.args.reprocess_existing,
        )
        state.chunks.extend(new)
        return Plan(state, resumed, new, skipped)

    def _job_alive(self, chunk: Chunk) -> bool:
        """A resumed chunk's job still known to the service (an expired one is planned anew)."""
        if chunk.job_id is None:
            return True
        try:
            self.jobs[chunk.idempotency_key] = self.client.job(chunk.job_id)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _confirm(self, chunks: Sequence[Chunk]) -> bool:
        """Quote the new chunks; ask before spending more than --confirm-over."""
        err = sys.stderr
        total = 0
        for chunk in chunks:
            quote = self.client.quote_job(
                self.operation, self._files(chunk), options=self.command.options
            )
            chunk.quoted_credits = quote.credits
            total += chunk.quoted_credits
            for failed in quote.failed:
                err.write(f"  would fail: {failed.name}: {failed.code}: {failed.message}\n")
        images = sum(len(c.files) for c in chunks)
        if total <= self.args.confirm_over or self.args.yes:
            return True
        question = f"Spend {total} credits on {images} images? [y/N] "
        if not sys.stdin.isatty():
            err.write(
                f"imgsvc batch: {question.split('?')[0]}? Over --confirm-over "
                f"{self.args.confirm_over}: pass --yes, or run on a terminal. Nothing spent.\n"
            )
            return False
        err.write(question)
        err.flush()
        if sys.stdin.readline().strip().lower() in ("y", "yes"):
            return True
        err.write("nothing spent\n")
        return False

    def _files(self, chunk: Chunk) -> list[tuple[str, Path]]:
        return [(name, self.by_name[name].path) for name in chunk.files]

    def _save(self, state: State) -> None:
        state.save(self.state_path)
        self.state_saved = True

    def _submit(self, state: State) -> None:
        for chunk in state.chunks:
            if chunk.job_id is not None:
                continue
            self._save(state)  # the key is on disk before the service can see it
            try:
                job = self.client.submit_job(
                    self.operation,
                    self._files(chunk),
                    options=self.command.options,
                    webhook_url=self.command.webhook_url,
                    idempotency_key=chunk.idempotency_key,
                )
            except ApiError as exc:
                failed = exc.details.get("failed")
                if exc.status != 422 or not isinstance(failed, list):
                    raise
                # No image of this chunk can be processed: the service created and charged
                # nothing. Its images are failures (retried by a rerun); the others go on.
                self.refused.extend(_refused(chunk, failed))
                chunk.downloaded = True
                self._save(state)
                continue
            chunk.job_id = _job_id(job)
            self.jobs[chunk.idempotency_key] = job
            self._save(state)

    def _follow(self, state: State) -> list[Failure]:
        """Poll the jobs, saving each one's outputs as soon as it is finished.

        Each round reads the oldest unfinished job and one other in turn, so that many chunks
        do not turn into many requests a second.
        """
        failures: list[Failure] = []
        pending = [c for c in state.chunks if not c.downloaded]
        turn = 0
        while pending:
            turn += 1
            other = pending[turn % len(pending)]
            for chunk in [pending[0]] if other is pending[0] else [pending[0], other]:
                assert chunk.job_id is not None
                job = self.client.job(chunk.job_id)
                self.jobs[chunk.idempotency_key] = job
                if job.finished:
                    failures.extend(self._finish(state, chunk, job))
                    pending.remove(chunk)
            self.progress.update(self.jobs.values())
            if pending:
                time.sleep(POLL_S)
        self.progress.end_line()
        return failures

    def _finish(self, state: State, chunk: Chunk, job: Job) -> list[Failure]:
        """Save a finished chunk's outputs and record them; the items without an output."""
        lost = save_outputs(self.client, job, self.out)
        bad = {f.name for f in lost}
        for item in job.items:
            name = item.name
            if item.status == "succeeded" and name in chunk.files and name not in bad:
                state.outputs[name] = chunk.files[name]
        chunk.downloaded = True
        self._save(state)
        return lost

    def _summary(self, plan: Plan, failures: Sequence[Failure]) -> int:
        out = sys.stdout
        jobs = [
            self.jobs[c.idempotency_key]
            for c in plan.state.chunks
            if c.idempotency_key in self.jobs
        ]
        charged = sum(j.credits_charged for j in jobs)
        failed_names = {f.name for f in failures}
        succeeded = sum(
            1
            for j in jobs
            for i in j.items
            if i.status == "succeeded" and i.name not in failed_names
        )
        out.write(f"succeeded: {succeeded}\n")
        out.write(f"failed: {len(failures)}\n")
        for failure in failures:
            out.write(f"  {failure.name}: {failure.code}: {failure.message}\n")
        out.write(f"skipped (output exists): {len(plan.skipped_existing)}\n")
        out.write(f"credits charged: {charged}\n")
        if failures:
            out.write("rerun the same command to retry the failed images\n")
        return EXIT_FAILED_ITEMS if failures else EXIT_OK


def _operation(name: str) -> Operation:
    for operation in OPERATIONS:
        if operation == name:
            return operation
    raise UsageError(f"unknown operation {name!r}")


def _command_line() -> str:
    """This process's command line, any key in it masked."""

    words: list[str] = []
    hide_next = False
    for word in sys.argv:
        flag, eq, _ = word.partition("=")
        if hide_next:
            words.append("<key>")
            hide_next = False
        elif len(flag) >= 3 and "--key".startswith(flag):  # argparse takes --ke, --k too
            words.append(f"{flag}=<key>" if eq else flag)
            hide_next = not eq
        else:
            words.append(shlex.quote(word))
    return " ".join(words)
