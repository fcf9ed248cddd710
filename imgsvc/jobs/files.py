"""A job's files on the folder shared by the API and the workers: `<root>/<job id>/in/<item>`,
`shared/<name>` (a background or mask every item uses) and `out/<item>-<token><ext>`.

Every file is written to a temporary name and renamed into place, so a reader never sees half
a file; a duplicate execution of an item writes its own output name and deletes it when its
result is not the one committed."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

_JOB_ID = re.compile(r"^job_[0-9a-f]{24}$")


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
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return relative
