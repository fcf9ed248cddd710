"""The operations, runnable without HTTP: one module per operation, all of the same shape.

Each module (`remove_background`, `upscale`, `inpaint`) has a pydantic options model (the single
source of the API's form fields, the OpenAPI docs, the quote and job options), an inputs
dataclass (the image bytes, or URLs), `prepare(options, inputs, ctx) -> Prepared` which
validates, decodes, picks the engine, plans and prices without doing the work, and `quote()`,
the same price from sizes alone. `Prepared.run()` does the work; `execute()` runs it charged
(admission → hold → run → capture, or release on any failure). Routes and batch workers call
exactly these.
"""

from imgsvc.operations.context import Context
from imgsvc.operations.prepared import Prepared, Quote, Result

__all__ = ["Context", "Prepared", "Quote", "Result"]
