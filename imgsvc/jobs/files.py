"""A job's files on the folder shared by the API and the workers: `<root>/<job id>/in/<item>`,
`shared/<name>` (a background or mask every item uses) and `out/<item>-<token><ext>`.

Every file is written to a temporary name and renamed into place, so a reader never sees half
a file; a duplicate execution of an item writes its own output name and deletes it when its
result is not the one committed. A full folder raises StorageFull, with no partial file left."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path

from imgsvc.errors import ServiceError

_JOB_ID = re.compile(r"^job_[0-9a-f]{24}$")
_FULL = {errno.ENOSPC, errno.EDQUOT}


class StorageFull(ServiceError):
    """The job folder has no room for a file (no space, or the quota is reached)."""

    code = "insufficient_storage"


class JobFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):  # ids are ours; anything else never becomes a path
            raise ValueError(f"not a job id: {job_id[:40]!r}")
        return self.root / job_id

    def path(self, job_id: str, relative: str) -> Path:
        return self.job_dir(job_id) / relative

    def write_input(self, job_id: str, item: int, data: bytes) -> str:
        return self._write(job_id, f"in/{item}", data)

    def write_shared(self, job_id: str, name: str, data: bytes) -> str:
        return self._write(job_id, f"shared/{name}", data)

    def write_output(self, job_id: str, item: int, ext: str, data: bytes) -> str:
        return self._write(job_id, f"out/{item}-{secrets.token_hex(6)}{ext}", data)

    def read(self, job_id: str, relative: str) -> bytes:
        return self.path(job_id, relative).read_bytes()

    def shared(self, job_id: str) -> dict[str, bytes]:
        folder = self.job_dir(job_id) / "shared"
        if not folder.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}

    def remove(self, job_id: str, relative: str) -> None:
        self.path(job_id, relative).unlink(missing_ok=True)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def job_ids_on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if _JOB_ID.match(p.name)]

    def _write(self, job_id: str, relative: str, data: bytes) -> str:
        final = self.path(job_id, relative)
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _FULL:
                raise StorageFull(
                    f"the job storage has no room for {len(data)} more bytes; nothing was "
                    "charged: retry later, or with fewer or smaller images"
                ) from exc
            raise
        return relative
