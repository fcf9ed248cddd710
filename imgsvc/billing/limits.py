"""The largest numbers the ledger takes: credits fit the ledger's 32-bit integer columns (on
PostgreSQL) with room for one call on top; ids fit a signed 64-bit integer."""

from __future__ import annotations

MAX_CREDITS = 10**9  # a balance, a grant or top-up, a monthly cap, one call (32-bit columns)
MAX_PRICE = 10**6  # one entry of the price table (per call, per megapixel or per step)
MAX_ID = 2**63 - 1  # a key's or account's id
MAX_ROWS = 10**9  # an offset into a list of usage rows or jobs
MAX_GRACE_SECONDS = 10 * 365 * 86_400  # how long a rotated-out key may stay valid
