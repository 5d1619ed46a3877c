"""Evaluation: metrics under the parallel formulation (``core``), the methods compared (``methods``), the suites
(``suites``), the runner with its parallel/online agreement check and kvpress bridge (``runner``) and the reports
(``report``). ``ccmem eval`` drives it from the command line."""

from .core import (
    PPL,
    budget_episode,
    bytes_per_slot,
    context_slots,
    gap_recovered,
    option_logliks,
    perplexity,
    strip_eos,
)
from .methods import Method, press, trained
from .runner import EvalConfig, evaluate, headline, score_online, score_parallel
from .suites import ChitchatSuite, Group, IclSuite, Query, RecallSuite, Suite

__all__ = [
    "PPL", "ChitchatSuite", "EvalConfig", "Group", "IclSuite", "Method", "Query", "RecallSuite", "Suite",
    "budget_episode",
    "bytes_per_slot", "context_slots", "evaluate", "gap_recovered", "headline",
    "option_logliks", "perplexity", "press", "score_online", "score_parallel", "strip_eos", "trained",
]
