"""The web page and the usage dashboard: static HTML, CSS and JavaScript, no build step.

Served by `imgsvc.routes.web`; `vendor/` holds the chart library, unmodified, with its licence.
"""
