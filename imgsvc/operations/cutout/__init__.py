"""Listing-ready cut-outs: option parsing, layout, marketplace presets, compliance, pipeline."""
