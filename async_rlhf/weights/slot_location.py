"""Where a published version lies in the shm slot ring, as the broker names it (`shm-slot://<root>#<slot>`).

Apart from shm_ring.py, which maps the slots with torch: the broker and its `WeightRef`, which every generator
call carries, then import no torch (a stand-in generator in the tests, the driver's broker)."""
from __future__ import annotations

import re
from pathlib import Path

SCHEME = "shm-slot://"


def slot_location(root: Path | str, slot: int) -> str:
    """A broker location naming slot `slot` of the ring at `root`."""
    return f"{SCHEME}{root}#{slot}"


def parse_slot_location(location: str) -> tuple[Path, int] | None:
    """(root, slot) of a `slot_location`, or None for any other kind of location."""
    if not location.startswith(SCHEME):
        return None
    match = re.fullmatch(r"(.+)#(\d+)", location[len(SCHEME):])
    if match is None:
        raise ValueError(f"malformed shm slot location '{location}'; expected {SCHEME}<root>#<slot>")
    return Path(match.group(1)), int(match.group(2))
