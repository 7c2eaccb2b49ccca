"""Stages that bring data in: read sources (ingest), download them (img2dataset), join the results."""
