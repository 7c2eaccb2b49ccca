"""The embedded demo world (DESIGN §7): a generated plant/general image world served on loopback with
the faults real crawls meet, plus ground truth and a held-out zero-shot evaluation set."""

from plantmix.demo.server import live_url, serve_world
from plantmix.demo.world import (
    DEMO_BASE_URL, EXPECTED_DOWNLOAD_OUTCOME, FAULTS, REFERENCE_DOWNLOAD_SETTINGS, generate_world,
    load_species_table,
)

__all__ = [
    "DEMO_BASE_URL", "EXPECTED_DOWNLOAD_OUTCOME", "FAULTS", "REFERENCE_DOWNLOAD_SETTINGS", "generate_world",
    "live_url", "load_species_table", "serve_world",
]
