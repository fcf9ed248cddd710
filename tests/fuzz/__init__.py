"""Fuzz harnesses of the decoders that read a caller's bytes: images, masks, zips, mask boxes.

`python -m tests.fuzz <target> --seconds N` fuzzes one target (atheris, coverage-guided, when
installed; else a mutation loop over the same seeds). Only the service's own errors
(`imgsvc.errors.ServiceError`) are expected; any other exception, or a broken invariant, is a
crash: its input is written to the artifacts folder and the run exits non-zero.
"""
