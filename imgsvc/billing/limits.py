"""The largest numbers the ledger takes: every count of credits and every id stays well inside
a signed 64-bit integer (SQLite and PostgreSQL store them as such)."""

from __future__ import annotations

MAX_CREDITS = 10**15  # a balance, a grant or top-up, a monthly cap, a price
MAX_PRICE = 10**9  # one entry of the price table (per call, per megapixel or per step)
MAX_ID = 2**63 - 1  # a key's or account's id
MAX_ROWS = 10**9  # an offset into a list of usage rows or jobs
MAX_GRACE_SECONDS = 10 * 365 * 86_400  # how long a rotated-out key may stay valid
