"""Data: one episode schema, the sources that produce it, and the collator that lays episodes out for training."""

from .collate import Collator, lm_loss
from .dialog import Dialog, DialogEpisodes, DialogFormat, split_dialogs
from .episode import Episode
from .sources import RowError, load_chitchat, load_jsonl_dialogs, load_jsonl_episodes

__all__ = [
    "Collator",
    "Dialog",
    "DialogEpisodes",
    "DialogFormat",
    "Episode",
    "RowError",
    "load_chitchat",
    "load_jsonl_dialogs",
    "load_jsonl_episodes",
    "lm_loss",
    "split_dialogs",
]
