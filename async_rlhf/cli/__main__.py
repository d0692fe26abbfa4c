"""`python -m async_rlhf.cli ...`: the same as the `async-rlhf` command."""
import sys

from async_rlhf.cli.main import main

sys.exit(main())
