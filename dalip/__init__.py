"""DALIP: CLIP training that aligns first-order (CLS/EOT) and second-order (BDC) token statistics.

Modules: `dalip.mbdc` (the MBDC module), `dalip.model` (open_clip wrapper, `create_model`),
`dalip.loss` (`DALIPLoss`). Import them directly; this package file stays free of torch imports so
the CLI starts fast.
"""

__version__ = "0.1.0"


class DalipError(Exception):
    """An error caused by the user's input (model name, config, arguments), explained in one line."""

    exit_code = 2
