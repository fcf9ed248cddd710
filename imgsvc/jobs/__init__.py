"""Batch jobs: the job store, its runners, webhooks and the zip formats."""
