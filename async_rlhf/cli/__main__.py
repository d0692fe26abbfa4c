"""`python -m async_rlhf.cli ...`: the same as the `async-rlhf` command."""
from async_rlhf.cli.main import entry

entry()
