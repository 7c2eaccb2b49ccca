"""Scorer-model embeddings (DESIGN §3, §6): one forward pass per downloaded image and caption, cached per
download tar in clip-retrieval's layout, read by every model-based curation step."""
