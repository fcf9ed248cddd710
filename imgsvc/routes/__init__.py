"""HTTP layer: one router per resource. Nothing below this package knows about HTTP."""
