import os

# albumentations (pulled in by clip-retrieval) phones home on import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
