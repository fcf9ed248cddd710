"""Money: API keys, prices, the credit ledger and usage records. No HTTP here."""
