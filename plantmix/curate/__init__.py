"""Curation: stages that propose (filters, dedup) and the one step that decides (DESIGN §3)."""
