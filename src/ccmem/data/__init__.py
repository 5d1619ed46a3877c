"""Data: one episode schema, the sources that produce it, and the collator that lays episodes out for training."""

from .collate import Collator, lm_loss
from .dialog import Dialog, DialogEpisodes, DialogFormat, Mixture, Weighted, split_dialogs
from .episode import Episode
from .episode_file import EpisodeFile, write_episodes
from .hub import (
    LAMP2_LABELS,
    clean_text,
    lamp2_entry,
    lamp2_episodes,
    load_dailydialog,
    load_lamp2,
    load_metaicl,
    load_soda,
    metaicl_episodes,
)
from .sources import RowError, load_chitchat, load_jsonl_dialogs, load_jsonl_episodes

__all__ = [
    "Collator",
    "Dialog",
    "DialogEpisodes",
    "DialogFormat",
    "Episode",
    "EpisodeFile",
    "LAMP2_LABELS",
    "Mixture",
    "RowError",
    "Weighted",
    "clean_text",
    "lamp2_entry",
    "lamp2_episodes",
    "load_chitchat",
    "load_dailydialog",
    "load_jsonl_dialogs",
    "load_jsonl_episodes",
    "load_lamp2",
    "load_metaicl",
    "load_soda",
    "lm_loss",
    "metaicl_episodes",
    "split_dialogs",
    "write_episodes",
]
