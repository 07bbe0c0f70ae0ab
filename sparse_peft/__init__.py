"""sparse_peft: sparse parameter-efficient fine-tuning, one Hydra entrypoint."""

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input the user can fix: printed as one line on stderr, exit code 2, no traceback."""
