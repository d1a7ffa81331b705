"""W&B's mode from a recipe's `wandb_mode`, without loading torch (the sweep runner needs it too)."""
from __future__ import annotations

import os
from pathlib import Path


def resolve_wandb_mode(mode: str) -> str:
    """auto -> online when W&B credentials are present, else offline (never blocks on a login prompt)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    netrc = Path.home() / ".netrc"
    if not has_key and netrc.exists():
        has_key = "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if has_key else "offline"
